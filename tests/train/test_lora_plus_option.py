"""TrainConfig.lora_plus_ratio: B matrices take steps `ratio` times larger than A (LoRA+)."""
from _tiny_train import lm_rows, tiny_llama

from peftkit.methods.lora import LoraLayer
from peftkit.train import TrainConfig, train


def _adam_first_step_sizes(tmp_path, ratio):
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    config = TrainConfig(output_dir=str(tmp_path), max_steps=1, lr=1e-3, micro_batch_size=4, warmup_steps=0,
                         scheduler="constant", max_grad_norm=None, save_every=0, progress=False,
                         lora_plus_ratio=ratio)
    train(model, lm_rows(4), config=config)
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    name_of = {id(p): n for n, p in model.named_parameters()}
    # Adam's first step moves every element by ~lr (sign of its gradient), so the median
    # absolute change is the group's learning rate.
    step_a = (a.detach() - before[name_of[id(a)]]).abs().median().item()
    step_b = (b.detach() - before[name_of[id(b)]]).abs().median().item()
    return step_a, step_b


def test_lora_plus_ratio_scales_the_b_learning_rate(tmp_path):
    plain_a, plain_b = _adam_first_step_sizes(tmp_path / "plain", None)
    plus_a, plus_b = _adam_first_step_sizes(tmp_path / "plus", 16.0)
    assert abs(plain_b / plain_a - 1) < 0.2
    assert abs(plus_a - plain_a) / plain_a < 0.2
    assert 12 < plus_b / plus_a < 20
