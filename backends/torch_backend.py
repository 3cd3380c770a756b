"""The torch.distributed backend: one program per plan, launched with torchrun.

Process groups: `rt.init_mesh(MESH, backend="torch")` calls `init_process_group` (gloo on
CPU, NCCL on GPU) and `dist.new_group` once per slice of every mesh axis; collectives
are the runtime's differentiable ones over those groups.

    >>> src = emit(sharded, model_name="GPT")                    # doctest: +SKIP
"""
from __future__ import annotations

from autopar.backends.codegen import Backend, EmitOptions, emit_program
from autopar.compiler.ir import Graph


class TorchBackend(Backend):
    def launch_command(self, file: str, world: int, extra: str = "") -> str:
        return f"OMP_NUM_THREADS=1 torchrun --nproc-per-node {world} {file} {extra}".rstrip()


TORCH = TorchBackend(
    name="torch", runtime="torch",
    groups_comment=("Process groups: init_process_group (gloo on CPU, NCCL on GPU) and one "
                    "dist.new_group per slice of each mesh axis, made by rt.init_mesh."),
    launcher="torchrun (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from the environment)")


def emit(sharded: Graph, model_name: str, opts: EmitOptions = EmitOptions(),
         file_name: str = "program.py") -> str:
    """The torch.distributed program for a sharded graph."""
    return emit_program(sharded, TORCH, model_name, opts, file_name)


__all__ = ["TORCH", "TorchBackend", "emit"]
