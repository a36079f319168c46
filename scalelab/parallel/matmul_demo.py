"""``scalelab parallel matmul-demo``: C = A @ B (16 x 16) on 8 processes of a 2 x 4 mesh, by hand.

The product is the einsum  C[i, j] = sum_k A[i, k] B[k, j]  ("ik,kj->ij"). Mesh axes are
named ``data`` (2) and ``model`` (4), and each array axis is mapped to a mesh axis:

    A[i, k]: i over data, k over model  ->  every rank holds an 8 x 4 block
    B[k, j]: k over data, j over model  ->  every rank holds an 8 x 4 block
    C[i, j]: i over data, j over model  ->  every rank computes an 8 x 4 block

Rank (d, m) needs all of k for its rows i and columns j: it all-gathers A along the
``model`` axis (its 4 row-mates) and B along the ``data`` axis (its 2 column-mates),
then runs the einsum locally. No partial sums cross the network: k is gathered, not
reduced. C is then checked against the one-process product.
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

N = 16
MESH = (2, 4)
AXES = ("data", "model")


def _span(dim_len: int, parts: int, idx: int) -> str:
    size = dim_len // parts
    return f"{idx * size}:{(idx + 1) * size}"


def _operands() -> tuple[torch.Tensor, torch.Tensor]:
    # Small integers: every product and sum is exact in fp32, so the check can demand equality.
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-3, 4, (N, N), generator=g).float()
    b = torch.randint(-3, 4, (N, N), generator=g).float()
    return a, b


def _worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", MESH, mesh_dim_names=AXES)
        d, m = mesh.get_coordinate()
        a_full, b_full = _operands()
        # Placements are per mesh axis: (data, model).
        a = distribute_tensor(a_full, mesh, [Shard(0), Shard(1)])  # i over data, k over model
        b = distribute_tensor(b_full, mesh, [Shard(0), Shard(1)])  # k over data, j over model

        a_rows = a.redistribute(mesh, [Shard(0), Replicate()]).to_local()  # all-gather over model: A[i_d, :]
        b_cols = b.redistribute(mesh, [Replicate(), Shard(1)]).to_local()  # all-gather over data:  B[:, j_m]
        c_block = torch.einsum("ik,kj->ij", a_rows, b_cols)
        c = DTensor.from_local(c_block, mesh, [Shard(0), Shard(1)])

        row_mates = mesh["model"].mesh.tolist()
        col_mates = mesh["data"].mesh.tolist()
        i, k_a = _span(N, MESH[0], d), _span(N, MESH[1], m)
        k_b, j = _span(N, MESH[0], d), _span(N, MESH[1], m)
        line = (
            f"rank {rank} (data={d}, model={m}): holds A[{i}, {k_a}] and B[{k_b}, {j}]; "
            f"all-gathers A[{i}, 0:{N}] from ranks {row_mates} ({a_rows.numel() - a.to_local().numel()} floats in) "
            f"and B[0:{N}, {j}] from ranks {col_mates} ({b_cols.numel() - b.to_local().numel()} floats in); "
            f"computes C[{i}, {j}] = einsum('ik,kj->ij')"
        )
        lines = [None] * world if rank == 0 else None
        dist.gather_object(line, lines, dst=0)
        c_full = c.full_tensor()
        if rank == 0:
            print(f"C = A @ B, {N}x{N}, on a {MESH[0]}x{MESH[1]} mesh with axes {AXES} (gloo, {world} processes)")
            print("A[i, k]: i over data, k over model | B[k, j]: k over data, j over model | C[i, j]: i over data, j over model")
            print("\n".join(lines))
            ok = torch.equal(c_full, a_full @ b_full)
            print(f"C matches the one-process product: {ok} (max |difference| {(c_full - a_full @ b_full).abs().max().item()})")
            if not ok:
                raise SystemExit(1)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run() -> None:
    """Spawn the 8 processes here; no torchrun needed."""
    world = MESH[0] * MESH[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # fork skips 8 fresh torch imports (the parent has run no torch ops, so no thread pool to inherit)
    method = "fork" if sys.platform == "linux" else "spawn"
    mp.start_processes(_worker, args=(world, _free_port()), nprocs=world, join=True, start_method=method)
