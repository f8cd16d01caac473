"""``python -m bench concat``: fused_kv_concat vs eager PyTorch and torch.compile."""

from bench import kv_ops

COMMAND = "concat"
HELP = "fused KV concatenation + RoPE re-positioning of all chunks and layers (memory bound)"


def add_arguments(parser) -> None:
    kv_ops.add_shape_arguments(parser)


def run(args) -> dict:
    return kv_ops.run_concat(args)
