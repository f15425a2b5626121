"""TrainConfig.compile: the loop compiles each decoder layer and trains to the same weights."""
import torch
from _tiny_train import lm_rows, tiny_llama

from peftkit.train import TrainConfig, train


def _run(folder, compile_layers, dropout=0.0):
    model = tiny_llama(dropout=dropout)
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


def test_compiled_layers_train_with_dropout(tmp_path):
    # Inside the compiled layers the mask seed is a traced random draw (inductor's generator,
    # not eager's), and the mask itself comes from opaque custom ops running the eager hash. The
    # masks differ from an eager run's, so this checks the run: it trains, every adapter moves.
    start = {n: p.detach().clone() for n, p in tiny_llama(dropout=0.1).named_parameters() if p.requires_grad}
    compiled = _run(tmp_path / "compiled", True, dropout=0.1)
    assert all(layer._compiled_call_impl is not None for layer in compiled.get_base_model().model.layers)
    moved = {n: float((p.detach() - start[n]).abs().max()) for n, p in compiled.named_parameters() if p.requires_grad}
    assert min(moved.values()) > 0 and all(torch.isfinite(p).all() for p in compiled.parameters())
