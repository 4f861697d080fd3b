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
        self.sums: torch.Tensor | None = None  # [images, tokens, gh*gw], float32, on the UNet's device
        self.counts = torch.zeros(num_images, dtype=torch.long)
        # False skips recording (a host may record a subset of steps); outputs are never touched
        self.active = True
        self._index_cache: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}
        self._attached: list[tuple[nn.Module, Any]] = []

    # --- attach / detach ----------------------------------------------------------------------
    def attach(self, modules: Iterable[nn.Module]) -> "AttentionRecorder":
        for module in modules:
            previous = module.__dict__.get("forward", _NO_INSTANCE_FORWARD)
            self._attached.append((module, previous))
            module.forward = self._make_forward(module, previous)
        return self

    def detach(self) -> None:
        """Leave every module exactly as it was (including someone else's instance forward)."""
        self._resolved_context = None
        while self._attached:
            module, previous = self._attached.pop()
            if previous is _NO_INSTANCE_FORWARD:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous

    def __enter__(self) -> "AttentionRecorder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        return bool(self._attached)

    def _make_forward(self, module: nn.Module, previous: Any):
        recorder = self

        def forward(*args: Any, **kwargs: Any):
            # ldm/sgm call attn2(x, context=...); diffusers passes encoder_hidden_states
            x = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
            context = kwargs.get("context", kwargs.get("encoder_hidden_states"))
            if context is None and len(args) > 1:
                context = args[1]
            if (context is not None and x is not None and x.ndim == 3
                    and x.shape[1] == recorder.grid[0] * recorder.grid[1]):
                recorder.observe(module, x, context)
            if previous is not _NO_INSTANCE_FORWARD:
                return previous(*args, **kwargs)
            return type(module).forward(module, *args, **kwargs)

        return forward

    # --- recording ----------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, module: nn.Module, x: torch.Tensor, context: torch.Tensor) -> None:
        if not self.active:
            return
        rows = [(r, img) for r, img in enumerate(self._rows_for(context))
                if img is not None and r < x.shape[0]]
        if not rows:
            return
        picked = self._select([r for r, _ in rows], x.device)
        q = module.to_q(x[picked] if isinstance(picked, slice) else x.index_select(0, picked))
        k = module.to_k(context[picked] if isinstance(picked, slice) else context.index_select(0, picked))
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
        """Add softmax(QKᵀ/√d), averaged over heads, of projected queries [b, n, heads·d] and keys
        [b, m, heads·d] (row i belongs to ``images[i]``): hosts that hand out q and k (Forge's
        attention patches) call this directly. One batched product in the model's own precision
        (as the attention itself computes it), softmax accumulated in float32."""
        b, n, inner = q.shape
        dim_head = inner // heads
        q = q.reshape(b, n, heads, dim_head).transpose(1, 2)
        k = k.reshape(b, k.shape[1], heads, dim_head).transpose(1, 2)
        scores = q @ (k.transpose(-1, -2) * dim_head ** -0.5).to(q.dtype)  # [b, h, n, m]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        token_maps = probs.mean(dim=1).transpose(1, 2)  # [b, m, n]; stays on the device: no sync
        self._accumulate(list(images), token_maps)

    def _rows_for(self, context: torch.Tensor) -> Sequence[int | None]:
        if self.resolve_rows is None:
            return self.row_images
        # every attn2 of one UNet call gets the same context object: resolve it once per call (the
        # held reference keeps that object alive, so identity cannot be confused with a new one)
        if context is not self._resolved_context:
            self._resolved_context, self._resolved_rows = context, list(self.resolve_rows(context))
        return self._resolved_rows

    def _accumulate(self, images: list[int], token_maps: torch.Tensor) -> None:
        tokens = token_maps.shape[1]
        if self.sums is None:
            self.sums = token_maps.new_zeros(self.num_images, tokens, token_maps.shape[2])
        elif self.sums.shape[1] < tokens:  # a longer context than seen so far (prompt editing)
            grown = token_maps.new_zeros(self.num_images, tokens, self.sums.shape[2])
            grown[:, : self.sums.shape[1]] = self.sums
            self.sums = grown
        if len(set(images)) == len(images):  # one add for all rows
            target = self._select(images, self.sums.device)
            if isinstance(target, slice):
                self.sums[target, :tokens] += token_maps
            else:
                self.sums[:, :tokens].index_add_(0, target, token_maps)
        else:
            for row, img in enumerate(images):
                self.sums[img, :tokens] += token_maps[row]
        for img in images:
            self.counts[img] += 1

    # --- results ------------------------------------------------------------------------------
    def maps(self, image: int) -> torch.Tensor | None:
        """[tokens, gh, gw] mean attention of one image, or None if nothing was recorded."""
        if self.sums is None or self.counts[image] == 0:
            return None
        return (self.sums[image] / self.counts[image]).view(-1, *self.grid).cpu()

    def nbytes(self) -> int:
        return 0 if self.sums is None else self.sums.numel() * self.sums.element_size()

    def clear(self) -> None:
        self.sums = None
        self.counts.zero_()
