"""Decoding one token at a time through a static step, replayed as a CUDA graph.

Most decoded tokens neither close a chunk nor retrieve: the work is the same kernels on the same
buffers each time, only the token and its position change. :class:`GraphDecoder` writes that step
with the position as a device tensor and every shape fixed (the sliding-window rings, a buffer for
the open chunk's lower-layer states, the retrieval row of the current chunk and the chunk memory),
captures it once as a CUDA graph and replays it per token: a token then costs one graph launch
instead of hundreds of kernel launches from Python. A token that closes a chunk (one in every
``text_per_chunk``) takes the ordinary streaming path, which encodes the chunk and retrieves; the
decoder then copies the new retrieval row (and, with an offloaded memory, the chunks it picked)
into the static buffers.

    cache = model.new_cache(1, max_tokens=prompt_len + new_tokens)
    logits = model(prompt, cache=cache, logits_to_keep=1).logits[:, -1]
    dec = GraphDecoder(model, cache)
    for _ in range(new_tokens):
        nxt = logits.argmax(-1)
        logits = dec.step(nxt)        # (B, V), equal to model(nxt[:, None], cache=cache).logits[:, -1]

``model.generate`` does this by itself on CUDA (``compile_step=True`` compiles the step first).
Without CUDA (or with ``graph=False``) the same static step runs eagerly, which is how the CPU
tests check it against the streaming path.

Shape letters: B batch, S chunk positions, Hk memory heads, D head size, d model width, K retrieved
chunks per query chunk, V vocabulary.
"""

from __future__ import annotations

import torch

from gca.config import integer_dtype
from gca.inference.cache import DRTCache
from gca.nn.layers import apply_rope, rope_cos_sin
from gca.ops.sliding_window import sdpa


def _attn_static(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ring, pos: torch.Tensor) -> torch.Tensor:
    """One position per row, ``pos`` ``(1,)`` on the device. A sliding window (``ring.W`` set): written
    into the ring at slot ``pos % W``, then attends to the ring as it stands, masked by which slots
    hold a position (always: whether the ring is full is not known inside a replayed graph). Full
    attention: written at slot ``pos`` of the key buffer, then attends to its whole capacity, masked
    to the slots up to ``pos``."""
    B = x.shape[0]
    qkv = attn.qkv(x).view(B, 1, 3, attn.h, attn.d).permute(2, 0, 3, 1, 4)
    (q, k), v = apply_rope(qkv[:2], cos, sin), qkv[2]
    if ring.W is None:
        slot = pos
        mask = (torch.arange(ring.k.shape[2], device=pos.device) <= pos)[None, :]
    else:
        slot = pos % ring.W
        ring.pos.index_copy_(0, slot, pos)
        mask = (ring.pos >= 0)[None, :]
    ring.k.index_copy_(2, slot, k.to(ring.k.dtype))
    ring.v.index_copy_(2, slot, v.to(ring.v.dtype))
    if ring.W is None:
        # the whole key buffer (up to 2x the positions, ~10^5): with one query row, SDPA's masked
        # kernels run one program per head over all of it (17.6 tok/s at 64K on an H200); two
        # matmuls spread the keys over the GPU (kv heads shared by groups of query heads)
        kk, vv = ring.k.to(q.dtype), ring.v.to(q.dtype)
        G = q.shape[1] // kk.shape[1]
        qg = q.reshape(B, kk.shape[1], G, q.shape[-1])  # (B, Hk, G, D): the query heads of one kv head
        cdt = torch.promote_types(q.dtype, torch.float32)  # fp32 at least (float64 stays float64)
        s = torch.matmul(qg, kk.transpose(-1, -2)).to(cdt) * q.shape[-1] ** -0.5  # (B, Hk, G, T)
        s = s.masked_fill(~mask, float("-inf"))
        y = torch.matmul(torch.softmax(s, -1).to(vv.dtype), vv).reshape(B, -1, 1, q.shape[-1])
        return attn.o(y.transpose(1, 2).reshape(B, 1, -1))
    y = sdpa(q, ring.k.to(q.dtype), ring.v.to(q.dtype), attn_mask=mask)
    return attn.o(y.transpose(1, 2).reshape(B, 1, -1))


class GraphDecoder:
    """Decode steps of one token per sequence for a model (``drt``, ``swa`` or ``full``) and its cache.

    Args:
        model: a :class:`gca.DRT` in eval mode. For the ``full`` baseline the key buffers grow by
            doubling and each step attends to their whole capacity, masked (so up to twice the keys
            a step needs); each growth captures the step again.
        cache: the model's streaming cache, usually right after the prompt's prefill. The decoder
            advances it exactly as ``model(ids[:, None], cache=cache)`` would, so the two can be mixed.
        graph: capture and replay a CUDA graph (default: when the model is on CUDA). ``False`` runs
            the same static step eagerly.
        compile: run the static step through ``torch.compile`` (Inductor fuses its norms, rotary
            embeddings and additions into fewer kernels) before the graph captures it. The first
            step then compiles (7-12 s for the small preset on an H200); the tokens are the same up to rounding.

    A captured graph holds the addresses of the cache's buffers; when the chunk memory grows (it
    doubles when full unless the cache was made with ``max_tokens``), the step is captured again.
    """

    @torch.inference_mode(False)  # normal tensors, as the streaming path keeps the cache (DRT._forward_cached)
    def __init__(self, model, cache: DRTCache, graph: bool | None = None, compile: bool = False):
        cfg = model.config
        if model.training:
            raise ValueError("GraphDecoder needs the model in eval mode: call model.eval() first")
        model.check_cache(cache)
        dev = model.embed.weight.device
        self.graph = dev.type == "cuda" if graph is None else bool(graph)
        if self.graph and dev.type != "cuda":
            raise ValueError(f"graph=True needs a CUDA model, this one is on {dev}")
        self.model, self.cache, self.cfg, self.dev = model, cache, cfg, dev
        B = cache.batch_size
        dt = model.embed.weight.dtype
        for ring in cache.lower + cache.upper:
            if ring.k.dtype != dt:
                ring.k, ring.v = ring.k.to(dt), ring.v.to(dt)
        self.tok = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.drt = cfg.arch == "drt"
        if self.drt:
            S, K = cfg.chunk_size, cfg.top_k
            self.pend = torch.zeros(B, S, cfg.hidden_size, dtype=dt, device=dev)
            self._pend_view = None  # the cache's pending_lower when it is a view of self.pend
            G = len(model.groups)
            self.idx = [torch.full((B, 1, K), -1, dtype=torch.long, device=dev) for _ in range(G)]
            wdt = torch.float64 if dt == torch.float64 else torch.float32  # as the eager path's weights (fp32 for half)
            self.w = [torch.zeros(B, 1, K, dtype=wdt, device=dev) for _ in range(G)]
            self._rows_seen: list = [None] * G  # the cache's last_rows entries copied into idx / w
            mem = cache.memory
            if mem.k is None:  # nothing stored yet: allocate at the cache's capacity hint
                mem._alloc(mem._cap, torch.empty(0, dtype=dt), torch.empty(0, dtype=dt))
                mem.k.zero_()  # only empty slots point here, but never hand unwritten memory to a kernel
                mem.v.zero_()
            if mem.offload:  # per group: the chunks its row picked, fetched once per chunk
                shape = (B * K, S, cfg.kv_heads, cfg.head_dim)  # at most B * K distinct chunks
                self.stage_k = [torch.zeros(shape, dtype=mem.k.dtype, device=dev) for _ in range(G)]
                self.stage_v = [torch.zeros(shape, dtype=mem.v.dtype, device=dev) for _ in range(G)]
        self._step_fn = torch.compile(self._static_step, dynamic=False) if compile else self._static_step
        self._graph = None
        self._graph_ptrs = None
        self._out = None
        self.replays = 0  # steps taken through the static step (graph or not)
        self.eager_steps = 0  # steps that closed a chunk and took the streaming path

    # ---- the static step ----
    def _memory(self, g: int):
        mem = self.cache.memory
        if mem.offload:  # one compact list shared by the batch rows, as ChunkMemory.fetch gives it
            B = self.cache.batch_size
            return (self.stage_k[g].unsqueeze(0).expand(B, *self.stage_k[g].shape),
                    self.stage_v[g].unsqueeze(0).expand(B, *self.stage_v[g].shape))
        return mem.k, mem.v

    def _static_step(self) -> torch.Tensor:
        m, cfg, cache = self.model, self.cfg, self.cache
        h = m.embed(self.tok)
        cos, sin = rope_cos_sin(self.pos, cfg.head_dim, cfg.rope_theta)
        cdt = torch.promote_types(h.dtype, torch.float32)
        cos, sin = cos.to(cdt), sin.to(cdt)
        for layer, ring in zip(m.lower, cache.lower):
            h = h + _attn_static(layer.attn, layer.norm1(h), cos, sin, ring, self.pos)
            h = h + layer.mlp(layer.norm2(h))
        if self.drt:
            self.pend.index_copy_(1, self.pos % cfg.chunk_size, h)
            rings = iter(cache.upper)
            for g, group in enumerate(m.groups):
                mk, mv = self._memory(g)
                for layer in group:
                    h = h + _attn_static(layer.attn, layer.norm1(h), cos, sin, next(rings), self.pos)
                    h = layer.gca_mlp(h, (mk, mv, self.idx[g], self.w[g]))
        return m._logits(m.norm(h))[:, -1]

    # ---- keeping the static buffers in step with the cache ----
    def _sync(self) -> None:
        cache = self.cache
        if not self.drt:
            return
        pl = cache.pending_lower
        if pl is not self._pend_view:  # the streaming path ran: copy the open chunk's states in
            if pl is not None and pl.shape[1]:
                self.pend[:, : pl.shape[1]].copy_(pl)
        rows = cache.last_rows
        mem = cache.memory
        for g in range(len(self.idx)):
            row = rows[g] if rows else None
            if row is not None and self._rows_seen[g] is row:
                continue
            self._rows_seen[g] = row
            if row is None:
                self.idx[g].fill_(-1)
                self.w[g].zero_()
                continue
            ridx, rw = row
            self.w[g].copy_(rw[:, None])
            if not mem.offload or mem.n == 0:
                self.idx[g].copy_(ridx[:, None])
                continue
            fk, fv, fidx = mem.fetch(ridx[:, None])
            mem.wait()
            U = fk.shape[1]
            self.stage_k[g][:U].copy_(fk[0])
            self.stage_v[g][:U].copy_(fv[0])
            self.idx[g].copy_(fidx)

    def _pointers(self):
        ptrs = [r.k.data_ptr() for r in self.cache.lower + self.cache.upper]
        if self.drt and not self.cache.memory.offload:
            ptrs += [self.cache.memory.k.data_ptr(), self.cache.memory.v.data_ptr()]
        return ptrs

    def _capture(self) -> None:
        torch.cuda.synchronize(self.dev)
        side = torch.cuda.Stream(self.dev)
        side.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: kernels compile and choose configs; the step is idempotent
                self._step_fn()
        torch.cuda.current_stream(self.dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._out = self._step_fn()
        self._graph, self._graph_ptrs = graph, self._pointers()

    # ---- public ----
    @torch.inference_mode(False)
    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence, ``ids`` ``(B,)`` (or ``(B, 1)``); returns the logits ``(B, V)``."""
        cache, cfg = self.cache, self.cfg
        # float or bool ids were truncated into the long token buffer, a (1, B) row read as B sequences
        if not isinstance(ids, torch.Tensor) or not integer_dtype(ids.dtype):
            what = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"ids must be an integer tensor of token ids, got {what}")
        if not (ids.dim() == 1 or (ids.dim() == 2 and ids.shape[1] == 1)):
            raise ValueError(f"ids must have shape (batch,) or (batch, 1): one token per sequence, got {tuple(ids.shape)}")
        ids = ids.reshape(-1, 1)
        if ids.shape[0] != cache.batch_size:
            raise ValueError(f"ids has batch {ids.shape[0]}, the cache was made for {cache.batch_size}")
        if ids.device.type == "cpu" and not (0 <= int(ids.min()) and int(ids.max()) < cfg.vocab_size):
            # checked where it costs no device sync (ids on the CPU); CUDA ids are the caller's to keep in range
            raise ValueError(f"ids must lie in [0, {cfg.vocab_size}), got values in [{int(ids.min())}, {int(ids.max())}]")
        if self.drt and cache.tokens % cfg.text_per_chunk == cfg.text_per_chunk - 1:
            # the token closes its chunk: its landmark follows, the chunk is encoded and retrieval runs
            self.eager_steps += 1
            return self.model(ids, cache=cache).logits[:, -1]
        self._sync()
        if self.cfg.arch == "full":
            for ring in cache.lower:
                ring.reserve(cache.positions + 1)
        self.tok.copy_(ids.to(self.dev))
        self.pos.fill_(cache.positions)
        if self.graph:
            if self._graph is None or self._graph_ptrs != self._pointers():
                self._capture()
            self._graph.replay()
            out = self._out.clone()
        else:
            out = self._step_fn()
        # host-side bookkeeping, as the streaming path keeps it
        p = cache.positions
        for ring in cache.lower + cache.upper:
            ring.length += 1
        cache.positions += 1
        cache.tokens += 1
        if self.drt:
            self._pend_view = cache.pending_lower = self.pend[:, : p % cfg.chunk_size + 1]
        self.replays += 1
        return out
