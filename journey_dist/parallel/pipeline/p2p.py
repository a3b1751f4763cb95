"""Pipeline point-to-point: the links between neighbouring stages, with shape-checked messages.

Forward pass: stage s isends its output activations to stage s+1, which irecvs them.
Backward pass: stage s+1 isends the gradient of its input to stage s, which irecvs it.
Each message is preceded by a header (microbatch, dtype, shape), so stages that disagree on what
crosses a boundary fail with a message naming both sides instead of hanging (or, on gloo, being
aborted without a Python traceback when a payload does not fit the posted buffer).

With v chunks per rank (the interleaved schedule) the stages form a ring: the last rank's chunk c
sends to the first rank's chunk c+1, and gradients go back the same way. Each message carries a
tag naming its direction and the receiving chunk, so every (peer, tag) channel delivers one
chunk's microbatches in order, whatever order the ranks interleave their chunks in.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class ShapeMismatchError(RuntimeError):
    """Two stages disagree on what crosses a stage boundary (shape, microbatch, direction)."""


WIRE_DTYPES = (  # dtypes a header can name, by index
    torch.float32, torch.bfloat16, torch.float16, torch.float64)


class P2P:
    """Links to the neighbouring stages: activations go to stage s+1, gradients to stage s-1.

    Every message is a small header (microbatch, dtype, shape) then the tensor. A send posts
    both with isend and moves on (the handles are waited at the end of the step), so a stage never
    stalls on a busy neighbour. A receive is posted ahead (`post`: the next message from each
    neighbour, so it lands while the stage computes) and checked when taken (`take`): a header
    that disagrees with the agreed shape raises there instead of hanging. A sender never sends a
    payload of another shape or dtype (it raises after the header instead): gloo aborts the
    process when a message does not fit the posted buffer, with no Python traceback.
    """

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device):
        self.group, self.device = group, device
        self.ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
        self.stage = dist.get_rank(group)
        self.num_stages = len(self.ranks)
        self.pending: list[tuple[dist.Work, torch.Tensor]] = []

    def peer(self, offset: int) -> int:
        return self.ranks[(self.stage + offset) % self.num_stages]

    @staticmethod
    def tag(kind: str, chunk: int) -> int:
        """The channel of a message: its direction and the chunk that receives it."""
        return 2 * chunk + (kind == "B")

    def send(self, tensor: torch.Tensor, kind: str, mb: int, expected: tuple[int, ...],
             dtype: torch.dtype, chunk: int = 0) -> None:
        """kind "F": activations to stage s+1; "B": input gradients to stage s-1 (chunk: the
        receiving rank's chunk)."""
        dst, tag = self.peer(1 if kind == "F" else -1), self.tag(kind, chunk)
        header = torch.tensor([mb, WIRE_DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape,
                               *[0] * (5 - tensor.dim())], device=self.device)
        self.pending.append((dist.isend(header, dst, group=self.group, tag=tag), header))
        if (tuple(tensor.shape), tensor.dtype) != (tuple(expected), dtype):
            self.pending[-1][0].wait()  # let the header reach the peer, so it fails with a message too
            what = "activations" if kind == "F" else "input gradients"
            raise ShapeMismatchError(
                f"stage {self.stage} produced {what} of shape {tuple(tensor.shape)} ({tensor.dtype}) for "
                f"microbatch {mb}, but the stages agreed on {tuple(expected)} ({dtype}): the stage "
                f"module's output does not match its boundary_shape() or parameter dtype")
        tensor = tensor.contiguous()
        self.pending.append((dist.isend(tensor, dst, group=self.group, tag=tag), tensor))

    def post(self, kind: str, mb: int, expected: tuple[int, ...], dtype: torch.dtype,
             chunk: int = 0) -> tuple:
        """Post the receive of microbatch mb's activations ("F") or gradients ("B") for this rank's
        `chunk`; no waiting."""
        src, tag = self.peer(-1 if kind == "F" else 1), self.tag(kind, chunk)
        header = torch.empty(8, dtype=torch.long, device=self.device)
        buf = torch.empty(expected, dtype=dtype, device=self.device)
        return (kind, mb, src, dist.irecv(header, src, group=self.group, tag=tag), header,
                dist.irecv(buf, src, group=self.group, tag=tag), buf)

    def take(self, posted: tuple) -> torch.Tensor:
        """Wait for a posted receive; raise ShapeMismatchError if the header is not what we expect."""
        kind, mb, src, header_work, header, work, buf = posted
        header_work.wait()
        h = header.tolist()
        got = (h[0], WIRE_DTYPES[h[1]], tuple(h[3:3 + h[2]]))
        if got != (mb, buf.dtype, tuple(buf.shape)):
            what = "activations" if kind == "F" else "gradients"
            raise ShapeMismatchError(
                f"stage {self.stage} expected {what} of shape {tuple(buf.shape)} ({buf.dtype}) for "
                f"microbatch {mb} from stage {self.ranks.index(src)}, but it sent shape {got[2]} "
                f"({got[1]}) for microbatch {got[0]}: the stages disagree on the model width, the "
                f"batch split or the schedule")
        work.wait()
        return buf

    def wait_sends(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()
