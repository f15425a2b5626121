"""TrainConfig.compile: the loop compiles each decoder layer and trains to the same weights."""
import torch
from _tiny_train import lm_rows, tiny_llama

from peftkit.train import TrainConfig, train


def _run(folder, compile_layers):
    model = tiny_llama()
    config = TrainConfig(output_dir=str(folder), max_steps=2, micro_batch_size=4, save_every=0, progress=False,
                         shuffle=False, compile=compile_layers)
    train(model, lm_rows(8), config=config)
    return model


def test_compiled_layers_train_like_eager_layers(tmp_path):
    eager = _run(tmp_path / "eager", False)
    compiled = _run(tmp_path / "compiled", True)
    layers = compiled.get_base_model().model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert all(layer._compiled_call_impl is None for layer in eager.get_base_model().model.layers)
    ours = {n: p for n, p in compiled.named_parameters() if p.requires_grad}
    for name, param in eager.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(ours[name], param, rtol=1e-4, atol=1e-5)
