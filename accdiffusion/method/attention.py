"""Record per-token cross-attention maps during the first pass.

A recorder attaches to the ``attn2`` modules of a UNet (ldm / sgm ``CrossAttention``: ``to_q``,
``to_k``, ``heads``, called with ``context=``) by setting an instance-level ``forward``. The
wrapper resolves the class ``forward`` at call time, so the WebUI's class-level swaps (SDP,
xformers, sub-quadratic) still run, and it only reads: outputs are untouched.

Only layers whose query length equals the chosen grid (gh·gw) are kept; softmax(QKᵀ/√d) is
averaged over heads and added into a running per-image, per-token sum: memory is
images × tokens × gh·gw, whatever the number of steps and layers.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

_NO_INSTANCE_FORWARD = object()
# pending attention scores (elements) before the recorder computes them: ~20 SDXL layers of one
# image at 1024² (20 heads × 1024 queries × 77 tokens each), 128 MiB of float32 probabilities
PENDING_SCORES = 32 * 2**20
PENDING_LAYERS = 64  # and at most this many layers' q and k held (a 512² SD1 image: ~85 MB)


def is_cross_attention(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("to_q", "to_k", "heads"))


MIDDLE_BLOCK_NAMES = ("middle_block", "mid_block")  # ldm/sgm, diffusers


def find_cross_attention(unet: nn.Module, include_middle: bool = True) -> list[nn.Module]:
    """Every ``attn2`` (cross-attention) module of a UNet, in module order; the recorder leaves out
    the middle block, as the reference does (up and down blocks only)."""
    return [m for name, m in unet.named_modules()
            if name.split(".")[-1] == "attn2" and is_cross_attention(m)
            and (include_middle or not any(part in MIDDLE_BLOCK_NAMES for part in name.split(".")))]


def downsampled_size(length: int, factor: int) -> int:
    """Size after the UNet's stride-2 downsamplings (each rounds up, like a 3×3 conv with pad 1)."""
    for _ in range(int(round(math.log2(factor)))):
        length = (length + 1) // 2
    return length


def restore_forward(module: nn.Module, previous: Any) -> None:
    """Put back the instance ``forward`` a wrapper replaced (someone else's), or remove ours."""
    if previous is _NO_INSTANCE_FORWARD:
        module.__dict__.pop("forward", None)
    else:
        module.forward = previous


class ProjectionCapture:
    """While an attn2 module runs, keep the outputs of its ``to_q`` on ``x`` and its ``to_k`` on
    the context (the first call of each with the expected batch and length), through instance
    ``forward`` wrappers that call what was there before and are removed on exit. An attention that
    does not call them so (fused projections, another extension's own) leaves ``q`` / ``k`` None."""

    def __init__(self, module: nn.Module, x: torch.Tensor, context: torch.Tensor):
        self.q: torch.Tensor | None = None
        self.k: torch.Tensor | None = None
        self._wrapped = [(module.to_q, "q", tuple(x.shape[:2])), (module.to_k, "k", tuple(context.shape[:2]))]
        self._previous: list[tuple[nn.Module, Any]] = []

    def __enter__(self) -> "ProjectionCapture":
        for linear, name, shape in self._wrapped:
            previous = linear.__dict__.get("forward", _NO_INSTANCE_FORWARD)
            self._previous.append((linear, previous))
            linear.forward = self._wrap(linear, previous, name, shape)
        return self

    def __exit__(self, *exc: object) -> None:
        while self._previous:
            restore_forward(*self._previous.pop())

    def _wrap(self, linear: nn.Module, previous: Any, name: str, shape: tuple[int, int]):
        def forward(inp: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = previous(inp, *args, **kwargs) if previous is not _NO_INSTANCE_FORWARD else \
                type(linear).forward(linear, inp, *args, **kwargs)
            if getattr(self, name) is None and tuple(inp.shape[:2]) == shape and out.ndim == 3:
                setattr(self, name, out)
            return out

        return forward


class AttentionRecorder:
    """Running per-token attention sums for the positive-prompt rows of one generation job.

    ``row_images`` must be set before each UNet call: for every batch row, the index of the image
    whose positive prompt it carries, or None (negative prompt, AND sub-prompt, ...). Rows marked
    None are not recorded.
    """

    def __init__(self, latent_size: tuple[int, int], num_images: int, downsample: int = 4):
        self.grid = (downsampled_size(latent_size[0], downsample), downsampled_size(latent_size[1], downsample))
        self.num_images = num_images
        self.row_images: Sequence[int | None] = ()
        # optional: derive row_images from each call's context (hosts whose batch layout varies)
        self.resolve_rows: Callable[[torch.Tensor], Sequence[int | None]] | None = None
        self._resolved_context: torch.Tensor | None = None
        self._resolved_rows: list[int | None] = []
        self._sums: torch.Tensor | None = None  # [images, tokens, gh*gw], float32, on the UNet's device
        self._counts = torch.zeros(num_images, dtype=torch.long)  # layer calls added per image
        # False skips recording (a host may record a subset of steps); outputs are never touched
        self.active = True
        self._index_cache: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}
        self._attached: list[tuple[nn.Module, Any]] = []
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # layers not yet added (add_qk)
        self._pending_key: tuple = ()

    # --- attach / detach ----------------------------------------------------------------------
    def attach(self, modules: Iterable[nn.Module]) -> "AttentionRecorder":
        for module in modules:
            previous = module.__dict__.get("forward", _NO_INSTANCE_FORWARD)
            self._attached.append((module, previous))
            module.forward = self._make_forward(module, previous)
        return self

    def detach(self) -> None:
        """Leave every module exactly as it was (including someone else's instance forward), then
        add the pending layers (the modules are restored even if that fails, e.g. out of memory)."""
        self._resolved_context = None
        while self._attached:
            restore_forward(*self._attached.pop())
        self.flush()

    def __enter__(self) -> "AttentionRecorder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        return bool(self._attached)

    def _make_forward(self, module: nn.Module, previous: Any):
        recorder = self

        def call_previous(*args: Any, **kwargs: Any) -> Any:
            if previous is not _NO_INSTANCE_FORWARD:
                return previous(*args, **kwargs)
            return type(module).forward(module, *args, **kwargs)

        def forward(*args: Any, **kwargs: Any):
            # ldm/sgm call attn2(x, context=...); diffusers passes encoder_hidden_states
            x = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
            context = kwargs.get("context", kwargs.get("encoder_hidden_states"))
            if context is None and len(args) > 1:
                context = args[1]
            if not (recorder.active and context is not None and x is not None and x.ndim == 3
                    and x.shape[1] == recorder.grid[0] * recorder.grid[1]):
                return call_previous(*args, **kwargs)
            rows = recorder._recorded_rows(x, context)
            if not rows:
                return call_previous(*args, **kwargs)
            # the projections the attention computes anyway are kept, not computed a second time
            with ProjectionCapture(module, x, context) as seen:
                out = call_previous(*args, **kwargs)
            recorder.observe(module, x, context, rows, seen.q, seen.k)
            return out

        return forward

    # --- recording ----------------------------------------------------------------------------
    def _recorded_rows(self, x: torch.Tensor, context: torch.Tensor) -> list[tuple[int, int]]:
        """(batch row, image) of every row of this call that carries a positive prompt."""
        return [(r, img) for r, img in enumerate(self._rows_for(context)) if img is not None and r < x.shape[0]]

    @torch.no_grad()
    def observe(self, module: nn.Module, x: torch.Tensor, context: torch.Tensor,
                rows: list[tuple[int, int]] | None = None, q: torch.Tensor | None = None,
                k: torch.Tensor | None = None) -> None:
        """Record one attn2 call: ``q`` / ``k`` are its projections of all rows when the attention
        computed them (see :class:`ProjectionCapture`), else they are computed here for the
        recorded rows only."""
        if not self.active:
            return
        rows = self._recorded_rows(x, context) if rows is None else rows
        if not rows:
            return
        picked = self._select([r for r, _ in rows], x.device)

        def take(t: torch.Tensor) -> torch.Tensor:
            return t[picked] if isinstance(picked, slice) else t.index_select(0, picked)

        q = take(q) if q is not None else module.to_q(take(x))
        k = take(k) if k is not None else module.to_k(take(context))
        self.add_qk(q, k, module.heads, [img for _, img in rows])

    def _select(self, indices: list[int], device: torch.device) -> slice | torch.Tensor:
        """A slice for consecutive indices (the usual cond block), else a cached index tensor: a
        new host→device copy per layer would make the CPU wait for the GPU at every layer."""
        if indices == list(range(indices[0], indices[-1] + 1)):
            return slice(indices[0], indices[-1] + 1)
        key = (tuple(indices), str(device))
        if key not in self._index_cache:
            self._index_cache[key] = torch.tensor(indices, device=device)
        return self._index_cache[key]

    @torch.no_grad()
    def add_qk(self, q: torch.Tensor, k: torch.Tensor, heads: int, images: Sequence[int]) -> None:
        """Record softmax(QKᵀ/√d), averaged over heads, of projected queries [b, n, heads·d] and keys
        [b, m, heads·d] (row i belongs to ``images[i]``): hosts that hand out q and k (Forge's
        attention patches) call this directly.

        The layers of one UNet call are computed together (:meth:`flush`), not one by one: on a GPU
        the per-layer products are tiny and their launches, not their arithmetic, cost time. A
        layer of another shape or other images, or the pending work growing past
        ``PENDING_SCORES`` / ``PENDING_LAYERS``, flushes first; reading the maps flushes too."""
        b, n, _ = q.shape
        key = (tuple(q.shape), tuple(k.shape), q.dtype, k.dtype, q.device, heads, tuple(images))
        if self._pending and (key != self._pending_key or len(self._pending) >= PENDING_LAYERS
                              or (len(self._pending) + 1) * b * heads * n * k.shape[1] > PENDING_SCORES):
            self.flush()
        self._pending_key = key
        self._pending.append((q, k))

    @torch.no_grad()
    def add_joint_qk(self, q: torch.Tensor, k: torch.Tensor, heads: int, images: Sequence[int],
                     text_keys: int) -> None:
        """Record a joint attention's text share: of the image queries q [b, n, heads·d] against
        all keys k [b, m, heads·d] whose first ``text_keys`` are the text's, the softmax over all m
        keys (as the block computes it), its text columns kept as they are (not renormalised:
        how much an image token attends to the text is part of where a word is), averaged over
        heads. Computed at once in query chunks of at most ``PENDING_SCORES`` scores, so a 1024²
        Flux block never holds its whole [heads, 4096, 4608] score matrix."""
        self.flush()
        b, n, inner = q.shape
        m = k.shape[1]
        dim_head = inner // heads
        qh = q.view(b, n, heads, dim_head).transpose(1, 2)
        kt = (k.view(b, m, heads, dim_head).transpose(1, 2) * dim_head ** -0.5).to(q.dtype).transpose(-1, -2)
        chunk = max(1, PENDING_SCORES // max(1, b * heads * m))
        shares = []
        for start in range(0, n, chunk):
            scores = (qh[:, :, start:start + chunk] @ kt).float()  # [b, heads, chunk, m]
            total = torch.logsumexp(scores, dim=-1, keepdim=True)
            shares.append((scores[..., :text_keys] - total).exp_().mean(dim=1))  # [b, chunk, text]
        self._accumulate(list(images), torch.cat(shares, dim=1).transpose(1, 2))

    @torch.no_grad()
    def flush(self) -> None:
        """Compute and add the pending layers: one batched product in the model's own precision
        (as the attention itself computes it), softmax in float32, summed over the layers."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        heads, images = self._pending_key[5], list(self._pending_key[6])
        qs = torch.stack([q for q, _ in pending])  # [layers, b, n, heads·d]
        ks = torch.stack([k for _, k in pending])  # [layers, b, m, heads·d]
        layers, b, n, inner = qs.shape
        dim_head = inner // heads
        q = qs.view(layers * b, n, heads, dim_head).transpose(1, 2)
        k = ks.view(layers * b, ks.shape[2], heads, dim_head).transpose(1, 2)
        scores = q @ (k.transpose(-1, -2) * dim_head ** -0.5).to(q.dtype)  # [layers·b, heads, n, m]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        token_maps = probs.view(layers, b, heads, n, -1).mean(dim=2).sum(dim=0).transpose(1, 2)  # [b, m, n]
        self._accumulate(images, token_maps, layers)  # stays on the device: no sync

    def _rows_for(self, context: torch.Tensor) -> Sequence[int | None]:
        if self.resolve_rows is None:
            return self.row_images
        # every attn2 of one UNet call gets the same context object: resolve it once per call (the
        # held reference keeps that object alive, so identity cannot be confused with a new one)
        if context is not self._resolved_context:
            self._resolved_context, self._resolved_rows = context, list(self.resolve_rows(context))
        return self._resolved_rows

    def _accumulate(self, images: list[int], token_maps: torch.Tensor, layers: int = 1) -> None:
        """Add ``token_maps`` (the sum over ``layers`` layers' maps) of each row into its image."""
        tokens = token_maps.shape[1]
        if self._sums is None:
            self._sums = token_maps.new_zeros(self.num_images, tokens, token_maps.shape[2])
        elif self._sums.shape[1] < tokens:  # a longer context than seen so far (prompt editing)
            grown = token_maps.new_zeros(self.num_images, tokens, self._sums.shape[2])
            grown[:, : self._sums.shape[1]] = self._sums
            self._sums = grown
        if len(set(images)) == len(images):  # one add for all rows
            target = self._select(images, self._sums.device)
            if isinstance(target, slice):
                self._sums[target, :tokens] += token_maps
            else:
                self._sums[:, :tokens].index_add_(0, target, token_maps)
        else:
            for row, img in enumerate(images):
                self._sums[img, :tokens] += token_maps[row]
        for img in images:
            self._counts[img] += layers

    # --- results ------------------------------------------------------------------------------
    def maps(self, image: int) -> torch.Tensor | None:
        """[tokens, gh, gw] mean attention of one image, or None if nothing was recorded."""
        self.flush()
        if self.sums is None or self.counts[image] == 0:
            return None
        return (self._sums[image] / self._counts[image]).view(-1, *self.grid).cpu()

    @property
    def sums(self) -> torch.Tensor | None:
        """Per image and token, the summed attention of every recorded layer call."""
        self.flush()
        return self._sums

    @property
    def counts(self) -> torch.Tensor:
        """Per image, how many layer calls :attr:`sums` holds."""
        self.flush()
        return self._counts

    def nbytes(self) -> int:
        return 0 if self.sums is None else self._sums.numel() * self._sums.element_size()

    def clear(self) -> None:
        self._pending = []
        self._sums = None
        self._counts.zero_()
