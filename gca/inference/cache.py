"""State for streaming a DRT over any number of tokens: sliding-window ring buffers, the chunk
memory (optionally offloaded to pinned CPU memory) and the per-group retrieval of the last
landmark.

    cache = model.new_cache(batch_size=1, offload=True)
    for piece in pieces:                      # any split of the input, 1 token to millions
        logits = model(piece, cache=cache).logits   # logits of the new tokens only

Shape letters: B batch, W window, H heads, D head size, S chunk positions, Hk memory heads,
d model width, N chunks in memory.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch


class RingKV:
    """The last W keys/values of one attention layer, written at slot ``position % W``.

    Keys are stored after the rotary rotation, so the slots' order does not matter: attention
    masks them by their absolute positions (``pos``, -1 = never written). ``W=None`` (the
    full-attention baseline) keeps every position instead, in buffers that grow by doubling
    (``length`` of them are used), so a decode step appends one position instead of copying all.
    """

    def __init__(self, B: int, H: int, W: int | None, D: int, device, dtype):
        self.W = W
        n = W or 0
        self.k = torch.zeros(B, H, n, D, device=device, dtype=dtype)
        self.v = torch.zeros(B, H, n, D, device=device, dtype=dtype)
        self.pos = torch.full((n,), -1, dtype=torch.long, device=device)
        self.length = 0  # positions written so far (W=None: all held; W set: the ring is full from W on)

    def keys_with(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """The stored keys/values/positions followed by new ones (not yet written)."""
        return (
            torch.cat([self.k.to(k.dtype), k], 2),
            torch.cat([self.v.to(v.dtype), v], 2),
            torch.cat([self.pos, pos]),
        )

    def reserve(self, need: int, dtype: torch.dtype | None = None) -> None:
        """W=None: make the buffers hold at least ``need`` positions in ``dtype`` (default theirs),
        growing by doubling. Slots not yet written are zero, so a masked read of the whole capacity
        (the CUDA-graph decoder's) never meets uninitialised memory."""
        dtype = dtype or self.k.dtype
        if need <= self.k.shape[2] and dtype == self.k.dtype:
            return
        cap = max(64, self.k.shape[2])
        while cap < need:
            cap *= 2
        B, H, _, D = self.k.shape
        nk = self.k.new_zeros(B, H, cap, D, dtype=dtype)
        nv = self.v.new_zeros(B, H, cap, D, dtype=dtype)
        nk[:, :, : self.length] = self.k[:, :, : self.length]
        nv[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = nk, nv

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """W=None: append k, v ``(B, H, n, D)``; returns views of every position held, new ones included."""
        need = self.length + k.shape[2]
        self.reserve(need, k.dtype)
        self.k[:, :, self.length : need] = k
        self.v[:, :, self.length : need] = v
        self.length = need
        return self.k[:, :, :need], self.v[:, :, :need]

    def write(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """k, v ``(B, H, n, D)`` at absolute positions ``pos`` ``(n,)``; only the last W are kept."""
        if self.W is None:
            self.append(k, v)
            return
        if k.shape[2] > self.W:
            k, v, pos = k[:, :, -self.W :], v[:, :, -self.W :], pos[-self.W :]
        if k.dtype != self.k.dtype:
            self.k, self.v = self.k.to(k.dtype), self.v.to(k.dtype)
        slot = pos % self.W
        self.k[:, :, slot] = k
        self.v[:, :, slot] = v
        self.pos[slot] = pos
        self.length += k.shape[2]

    @property
    def full(self) -> bool:
        """Every slot holds a position (W set): a host-side count, no device sync."""
        return self.W is not None and self.length >= self.W


class ChunkMemory:
    """Landmark keys ``(B, N, d)`` on the compute device; memory keys/values ``(B, N, S, Hk, D)`` on
    the device or, with ``offload=True``, in pinned CPU memory, fetched per retrieval.

    Storage grows by doubling. With offload, :meth:`fetch` copies only the chunks a retrieval
    picked (each distinct chunk once) into a pinned staging buffer and on to the device with a
    non-blocking copy on a side stream, so the transfer overlaps with the self-attention that
    runs before GCA; :meth:`wait` joins it.
    """

    def __init__(self, B: int, d: int, S: int, Hk: int, D: int, device, offload: bool, capacity: int = 64):
        self.B, self.d, self.S, self.Hk, self.D = B, d, S, Hk, D
        self.device = torch.device(device)
        self.offload = offload
        self.store_device = torch.device("cpu") if offload else self.device
        self.pin = offload and self.device.type == "cuda"
        self.store_pinned = self.pin  # False once page-locking the store failed (it then stays pageable)
        self.n = 0
        self.lmk = None
        self.k = self.v = None
        self._cap = capacity
        self._stream = torch.cuda.Stream(self.device) if self.pin else None
        self._event = None
        self.overlap = True  # False: copy on the compute stream (to measure what the side stream saves)
        self.bytes_fetched = 0
        self.chunks_fetched = 0
        self.fetch_host_s = 0.0  # host time spent choosing, gathering and enqueueing fetches

    def _alloc(self, cap: int, like: torch.Tensor, lmk: torch.Tensor):
        def grow(old, shape, dev, dtype, pin):
            new = None
            if pin and self.store_pinned:
                try:
                    new = torch.empty(shape, device=dev, dtype=dtype, pin_memory=True)
                except RuntimeError as e:  # the system's page-locked limit, reported as a CUDA "out of memory"
                    self.store_pinned = False
                    gb = math.prod(shape) * dtype.itemsize / 1e9
                    warnings.warn(
                        f"offload: could not page-lock {gb:.1f} GB of CPU memory for the chunk memory "
                        f"({str(e).splitlines()[0]}); keeping it in ordinary CPU memory instead, which works but "
                        "copies new chunks out synchronously. A smaller batch or context needs less, or raise the "
                        "system's locked-memory limit", stacklevel=2)
            if new is None:
                new = torch.empty(shape, device=dev, dtype=dtype)
            if old is not None and self.n:
                new[:, : self.n].copy_(old[:, : self.n])
            return new

        self.lmk = grow(self.lmk, (self.B, cap, self.d), self.device, lmk.dtype, False)
        shape = (self.B, cap, self.S, self.Hk, self.D)
        self.k = grow(self.k, shape, self.store_device, like.dtype, self.pin)
        self.v = grow(self.v, shape, self.store_device, like.dtype, self.pin)
        self._cap = cap

    def append(self, lmk: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """lmk ``(B, c, d)``, k/v ``(B, c, S, Hk, D)`` for c newly finished chunks."""
        c = lmk.shape[1]
        if c == 0:
            return
        if self.k is None or self.n + c > self._cap:
            cap = self._cap if self.k is None else max(self._cap, 64)  # the first allocation honours the hint
            while cap < self.n + c:
                cap *= 2
            self._alloc(cap, k, lmk)
        self.lmk[:, self.n : self.n + c] = lmk
        self.k[:, self.n : self.n + c].copy_(k, non_blocking=self.store_pinned)  # both stores pinned while it holds
        self.v[:, self.n : self.n + c].copy_(v, non_blocking=self.store_pinned)
        self.n += c

    def landmarks(self) -> torch.Tensor:
        return self.lmk[:, : self.n]

    def fetch(self, indices: torch.Tensor):
        """Memory for a retrieval with indices ``(B, Cq, K)``.

        Returns ``(mem_k, mem_v, indices)`` to pass to GCA: the device-resident memory as it is,
        or, when offloaded, a compact ``(B, U, S, Hk, D)`` copy holding only the picked chunks,
        with indices remapped into it.
        """
        if self.n == 0:
            return None  # nothing to retrieve yet: GCA contributes nothing
        if not self.offload:
            return self.k[:, : self.n], self.v[:, : self.n], indices
        t0 = time.perf_counter()
        B = indices.shape[0]
        flat = torch.where(indices >= 0, indices + torch.arange(B, device=indices.device)[:, None, None] * self._cap, -1)
        flat_cpu = flat.cpu()  # the one host sync: what to fetch
        uniq, inv = torch.unique(flat_cpu, return_inverse=True)
        has_empty = bool(uniq.numel()) and int(uniq[0]) < 0
        src = uniq[1:] if has_empty else uniq
        U = max(1, src.numel())
        # per batch row, the same compact list (rows of other batches are simply not indexed)
        shape = (U, self.S, self.Hk, self.D)
        kf = self.k.view(self.B * self._cap, self.S, self.Hk, self.D)
        vf = self.v.view(self.B * self._cap, self.S, self.Hk, self.D)
        alloc = torch.empty if src.numel() else torch.zeros  # never hand out unwritten memory
        stage_k = alloc(shape, dtype=self.k.dtype, pin_memory=self.pin)
        stage_v = alloc(shape, dtype=self.v.dtype, pin_memory=self.pin)
        if src.numel():
            torch.index_select(kf, 0, src, out=stage_k[: src.numel()])
            torch.index_select(vf, 0, src, out=stage_v[: src.numel()])
        new_idx = inv.view(indices.shape) - (1 if has_empty else 0)
        new_idx = torch.where(flat_cpu >= 0, new_idx, torch.full_like(new_idx, -1))
        self.bytes_fetched += 2 * stage_k.numel() * stage_k.element_size()
        self.chunks_fetched += src.numel()
        if self.pin and not self.overlap:
            mk = stage_k.to(self.device, non_blocking=True)
            mv = stage_v.to(self.device, non_blocking=True)
        elif self.pin:
            with torch.cuda.stream(self._stream):
                mk = stage_k.to(self.device, non_blocking=True)
                mv = stage_v.to(self.device, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record(self._stream)
            # tensors used on the main stream must not be freed early by the side stream's allocator
            mk.record_stream(torch.cuda.current_stream(self.device))
            mv.record_stream(torch.cuda.current_stream(self.device))
        else:
            mk, mv = stage_k.to(self.device), stage_v.to(self.device)
        # the op wants one memory per batch row: share the compact list across rows
        mk = mk.unsqueeze(0).expand(B, *shape)
        mv = mv.unsqueeze(0).expand(B, *shape)
        self.fetch_host_s += time.perf_counter() - t0
        return mk, mv, new_idx.to(indices.device)

    def wait(self) -> None:
        """Make the current stream wait for the last offloaded fetch."""
        if self._event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._event)
            self._event = None

    def nbytes_device(self) -> int:
        total = self.lmk.numel() * self.lmk.element_size() if self.lmk is not None else 0
        if not self.offload and self.k is not None:
            total += 2 * self.k.numel() * self.k.element_size()
        return total


@dataclass
class DRTCache:
    """Everything a DRT needs to continue a sequence. Make one with ``model.new_cache(B)``."""

    batch_size: int
    lower: list[RingKV]
    upper: list[RingKV]
    memory: ChunkMemory | None
    positions: int = 0  # internal positions consumed (text and landmarks)
    tokens: int = 0  # user tokens consumed
    pending_lower: torch.Tensor | None = None  # (B, <S, d) lower-layer output of the open chunk
    last_rows: list = field(default_factory=list)  # per group: (indices (B, K), weights (B, K)) of the last landmark
    keep_scores: bool = False  # keep last_scores (DRT.new_cache(keep_scores=True))
    last_scores: list = field(default_factory=list)  # per group: (B, c) scores of the last landmark (chunk c) over chunks 0..c-1
    skip_upper: bool = True  # with logits_to_keep, pieces beyond the upper layers' reach skip them (exact)
    skipped_tokens: int = 0  # user tokens that went through the lower layers only (skip_upper; swa: through none)
    made_for: dict | None = None  # the shape of the model that made it (DRT.new_cache); checked on use
    compute_dtype: torch.dtype | None = None  # the dtype it was filled in (the first use's); checked on use
