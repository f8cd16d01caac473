"""``python -m bench rope``: rope_reposition vs eager PyTorch and torch.compile."""

from bench import kv_ops

COMMAND = "rope"
HELP = "RoPE re-positioning of one layer's K in place (memory bound)"


def add_arguments(parser) -> None:
    kv_ops.add_shape_arguments(parser)


def run(args) -> dict:
    return kv_ops.run_rope(args)
