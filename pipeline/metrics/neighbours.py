"""Exact k-nearest-neighbour search between two large sets of vectors (l2), in chunks.

The memorisation audit compares every generated image with every training image: 50,000 x 50,000 at
32x32x3 is a 10 GB distance matrix in float32, so it is never built. Queries are taken in fixed chunks
of ``QUERY_CHUNK`` rows, each compared with the bank ``BANK_CHUNK`` rows at a time through one matrix
product (the BLAS/cuBLAS path), keeping a running top-k. The matrix-product identity |q|^2 + |b|^2 - 2 q.b
loses a close pair's distance to cancellation in float32, and close pairs are exactly what a copy detector
is about: the candidates that survive and are much closer than their vectors are long get their distance
recomputed from the difference, and the candidates are re-ranked.

Under torchrun/srun the query chunks are dealt over the ranks by their global position (chunk c to rank
c mod world size) and gathered back in index order, so every chunk is the same computation whatever the
world size: 1 and N ranks give bit-identical results.
"""

from __future__ import annotations

from typing import Optional

import torch

from pipeline.metrics.accumulators import FeatureBank

QUERY_CHUNK = 1024
BANK_CHUNK = 8192
RERANK_MARGIN = 8  # extra candidates kept from the matrix-product ranking, for the re-ranking
CANCELLATION = 1e-3  # a squared distance below this fraction of the two squared norms is recomputed exactly
RERANK_PAIRS = 4096  # pairs per exact recomputation step (its difference tensor is pairs x dim)


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Vectors as float32; uint8 pixels are scaled to [0, 1] (pixel banks are kept as uint8: 4x less memory)."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int,
                       self_index: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest bank rows of each query row: (distances N x k, ascending; bank indices N x k).

    ``self_index``: the bank index of each query when the queries are bank rows themselves (training
    set against itself): that row is excluded, so a point is not its own neighbour.
    """
    if k < 1:
        raise ValueError(f"k={k}: ask for at least one neighbour")
    available = len(bank) - (1 if self_index is not None else 0)
    if available < k:
        raise ValueError(f"{k} neighbours asked of a set of {available}; use a larger reference set or a smaller k")
    q = as_float(queries)
    bank = bank.to(q.device)  # a no-op when ``search`` has moved it once already
    q_norm = (q * q).sum(1)
    keep = min(k + RERANK_MARGIN, available)
    best_d = torch.empty((len(q), 0), device=q.device)
    best_i = torch.empty((len(q), 0), dtype=torch.long, device=q.device)
    bank_norms = []
    for start in range(0, len(bank), BANK_CHUNK):
        b = as_float(bank[start:start + BANK_CHUNK])
        bank_norms.append((b * b).sum(1))
        d2 = q_norm[:, None] + bank_norms[-1][None, :] - 2 * (q @ b.T)
        if self_index is not None:
            rows = torch.nonzero((self_index >= start) & (self_index < start + len(b))).flatten()
            d2[rows, self_index[rows] - start] = float("inf")
        d, i = d2.topk(min(keep, d2.shape[1]), dim=1, largest=False)
        best_d, order = torch.cat([best_d, d], 1).topk(min(keep, best_d.shape[1] + d.shape[1]), dim=1, largest=False)
        best_i = torch.cat([best_i, i + start], 1).gather(1, order)
    # where the identity cancels (a pair much closer than its vectors are long: a near-copy), recompute from the
    # difference; elsewhere its relative error is below 1e-4 and the pair is left as it is
    bank_norm = torch.cat(bank_norms)
    rows, cols = torch.nonzero(best_d < CANCELLATION * (q_norm[:, None] + bank_norm[best_i]), as_tuple=True)
    for start in range(0, len(rows), RERANK_PAIRS):
        r, c = rows[start:start + RERANK_PAIRS], cols[start:start + RERANK_PAIRS]
        best_d[r, c] = (q[r] - as_float(bank[best_i[r, c]])).pow(2).sum(1)
    distances, order = best_d.clamp_(min=0).sort(dim=1, stable=True)
    return distances[:, :k].sqrt(), best_i.gather(1, order)[:, :k]


def search(queries: torch.Tensor, bank: torch.Tensor, k: int, exclude_self: bool = False, rank: int = 0,
           world_size: int = 1, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``nearest_neighbours`` of every query, split over the ranks by query chunk and gathered on every rank
    (collective under DDP: every rank calls it with the same queries and bank). Results on the CPU."""
    distances = FeatureBank((k,)).to(device)
    indices = FeatureBank((k,), dtype=torch.long).to(device)
    bank = bank.to(device)
    for chunk, start in enumerate(range(0, len(queries), QUERY_CHUNK)):
        if chunk % world_size != rank:
            continue
        stop = min(start + QUERY_CHUNK, len(queries))
        position = torch.arange(start, stop, device=device)
        d, i = nearest_neighbours(queries[start:stop].to(device), bank, k, position if exclude_self else None)
        distances.update(d, position)
        indices.update(i, position)
    distances.join_if_empty()
    indices.join_if_empty()
    return distances.compute().cpu(), indices.compute().cpu()


def shifted(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Images (N x C x H x W) moved by (dy, dx) pixels, the uncovered border filled with 0 (the background of
    most datasets' padding, and of digits: a shifted digit that loses no ink is recovered exactly)."""
    h, w = images.shape[-2:]
    out = torch.zeros_like(images)
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        images[..., max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def merge_distinct(distances: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``k`` nearest distinct indices among candidate lists that may name an index several times
    (once per shift), each at its smallest distance."""
    d, order = distances.sort(dim=1, stable=True)
    i = indices.gather(1, order)
    i, by_index = i.sort(dim=1, stable=True)  # stable: within one index, the smallest distance comes first
    d = d.gather(1, by_index)
    repeat = torch.zeros_like(i, dtype=torch.bool)
    repeat[:, 1:] = i[:, 1:] == i[:, :-1]
    d = d.masked_fill(repeat, float("inf"))
    d, order = d.sort(dim=1, stable=True)
    return d[:, :k], i.gather(1, order)[:, :k]


def shift_tolerant_search(queries: torch.Tensor, bank: torch.Tensor, shape: tuple[int, ...], k: int,
                          max_shift: int, exclude_self: bool = False, rank: int = 0, world_size: int = 1,
                          device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``search`` in pixel space where the distance to a bank image is the smallest over the query moved by up
    to ``max_shift`` pixels each way: a copy shifted by a pixel is still a copy. Flat uint8 rows of images of
    ``shape`` (C, H, W). Exact: each of the k nearest under the shift-tolerant distance is among the k nearest
    of the shift that attains its distance, so merging the per-shift lists loses none."""
    images = queries.view(-1, *shape)
    found_d, found_i = [], []
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            d, i = search(shifted(images, dy, dx).flatten(1), bank, k, exclude_self, rank, world_size, device)
            found_d.append(d)
            found_i.append(i)
    if len(found_d) == 1:
        return found_d[0], found_i[0]
    return merge_distinct(torch.cat(found_d, 1), torch.cat(found_i, 1), k)
