"""The k-means colour palette of a shard directory, for palette-token autoregressive models (Image GPT)."""

from __future__ import annotations

import io

import torch

from pipeline.data.datamodule import reference_batches
from pipeline.data.manifest import load_manifest, manifest_hash
from pipeline.io import atomic_write_bytes, cache_dir

PALETTE_PIXELS = 200_000  # training pixels the k-means palette is fitted on


def fit_palette(shards: str, size: int, channels: int) -> torch.Tensor:
    """k-means colours (size x channels, values 0..255) of the first training pixels of ``shards``.

    Deterministic (same pixels, fixed seed) and cached under the manifest hash, so every rank and every
    reload gets the same palette without refitting.
    """
    from sklearn.cluster import MiniBatchKMeans  # imported here: only palette models need scikit-learn's k-means

    path = cache_dir() / "palettes" / f"{manifest_hash(load_manifest(shards))[:16]}-k{size}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    pixels, count = [], 0
    for batch in reference_batches(shards, "train", 1000):
        chunk = batch["image"].permute(0, 2, 3, 1).reshape(-1, batch["image"].shape[1])
        pixels.append(chunk)
        count += len(chunk)
        if count >= PALETTE_PIXELS:
            break
    data = torch.cat(pixels)[:PALETTE_PIXELS].float().numpy()
    if data.shape[1] != channels:
        raise ValueError(f"{shards} holds {data.shape[1]}-channel images, the model {channels}")
    kmeans = MiniBatchKMeans(n_clusters=size, random_state=0, n_init=3, batch_size=4096).fit(data)
    palette = torch.from_numpy(kmeans.cluster_centers_).float().round().clamp(0, 255)
    buf = io.BytesIO()
    torch.save(palette, buf)
    atomic_write_bytes(path, buf.getvalue())
    return palette
