"""Word maps from joint attention (Flux, Chroma, SD 3.5): image queries against text keys.

These transformers have no cross-attention: text and image tokens attend jointly. What the
recorder needs of a block is what its attention sees: the image tokens' queries and the text
tokens' keys after qk-norm (and, for Flux/Chroma, RoPE). Forward hooks read them where the block
computes them anyway, so recording never changes a value and adds no projection:

- Flux / Chroma double-stream block (Forge backend/nn/flux.py:206-264, chroma.py:58-85):
  ``img_attn.norm`` returns the image (q, k), ``txt_attn.norm`` the text (q, k), both [B, H, L, D];
  the block's ``pe`` argument holds the rotary embedding of the sequence [text; image]
  (flux.py:240-247: the text comes first), applied inside ``attention`` (flux.py:15-18), so the
  capture applies it too (:func:`apply_rope`).
- SD 3.5 (MMDiT-X) joint block (mmditx.py:636-667): the image stream's ``x_block.attn.ln_q`` and
  the text stream's ``context_block.attn.ln_k`` return q and k as [B, L, H, D] (mmditx.py:323-329,
  an ``nn.Identity`` when the model has no qk-norm: still called, still hooked); positions are
  added to the image tokens before the blocks (no RoPE).

Which softmax: the recorder takes softmax over the text keys only. That *is* the joint softmax
renormalised over the text keys (the image keys' terms cancel out of the ratio), so the two
choices of the issue are one; the third, the joint softmax's text share without renormalising,
would weight every image token by how much it attends to text at all rather than by which word
(tests/test_dit.py checks the identity). Which blocks: the double-stream blocks of Flux/Chroma
(their text keys still come from the text stream alone; the single-stream blocks mix both streams
into every key) and every joint block of SD 3.5. Per block the map costs one [image × text]
product per head, next to the block's own [(image + text)²] attention and its projections.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from .attention import AttentionRecorder


def apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, L, D] by the rotary embedding pe [B|1, 1, L, D/2, 2, 2] (Flux's EmbedND
    layout: per pair of channels the 2×2 matrix [[cos, −sin], [sin, cos]]), in float32, back in
    x's dtype; the same rotation the block's attention applies (flux.py:43-49)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
    return out.reshape(*x.shape).type_as(x)


def joint_family(model: nn.Module) -> str | None:
    """'flux' (double_blocks: Flux and Chroma), 'mmdit' (joint_blocks: SD 3 / 3.5), or None."""
    if isinstance(getattr(model, "double_blocks", None), nn.ModuleList):
        return "flux"
    if isinstance(getattr(model, "joint_blocks", None), nn.ModuleList):
        return "mmdit"
    return None


def recorded_blocks(model: nn.Module) -> list[nn.Module]:
    family = joint_family(model)
    if family == "flux":
        return list(model.double_blocks)
    if family == "mmdit":
        return list(model.joint_blocks)
    raise ValueError(f"{type(model).__name__} is not a joint-attention transformer this recorder knows")


def _heads(block: nn.Module, family: str) -> int:
    return int(block.num_heads if family == "flux" else block.x_block.attn.num_heads)


def _tokens_last(t: torch.Tensor, family: str) -> torch.Tensor:
    """[B, H, L, D] (flux) or [B, L, H, D] (mmdit) -> [B, L, H·D], as the recorder takes them."""
    if family == "flux":
        t = t.transpose(1, 2)
    return t.reshape(t.shape[0], t.shape[1], -1)


class JointAttentionCapture:
    """While entered, the chosen blocks of ``model`` feed ``recorder`` with the image-query →
    text-key attention of the rows ``row_images`` marks (the image of each batch row, or None for
    a row that is not a positive prompt). Hooks are removed on exit, also on error."""

    def __init__(self, model: nn.Module, recorder: AttentionRecorder, row_images: Sequence[int | None],
                 blocks: Sequence[nn.Module] | None = None):
        family = joint_family(model)
        if family is None:
            raise ValueError(f"{type(model).__name__} is not a joint-attention transformer this recorder knows")
        self.family: str = family
        self.recorder = recorder
        self.row_images = list(row_images)
        self.blocks = list(blocks) if blocks is not None else recorded_blocks(model)
        self._handles: list[Any] = []

    def __enter__(self) -> "JointAttentionCapture":
        try:
            for block in self.blocks:
                self._hook_block(block)
        except Exception:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        while self._handles:
            self._handles.pop().remove()

    # --- hooks ----------------------------------------------------------------------------------
    def _hook_block(self, block: nn.Module) -> None:
        seen: dict[str, Any] = {}
        if self.family == "flux":
            def before(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                seen["pe"] = kwargs["pe"] if "pe" in kwargs else args[3]
                seen["txt"] = int((kwargs["txt"] if "txt" in kwargs else args[1]).shape[1])

            self._handles.append(block.register_forward_pre_hook(before, with_kwargs=True))
            self._handles.append(block.img_attn.norm.register_forward_hook(self._keep(seen, "q", 0)))
            self._handles.append(block.txt_attn.norm.register_forward_hook(self._keep(seen, "k", 1)))
        else:
            self._handles.append(block.x_block.attn.ln_q.register_forward_hook(self._keep(seen, "q", None)))
            self._handles.append(block.context_block.attn.ln_k.register_forward_hook(self._keep(seen, "k", None)))

        def after(_m: nn.Module, _args: tuple, _out: Any) -> None:
            try:
                if "q" in seen and "k" in seen:
                    self._record(block, seen)
            finally:
                seen.clear()

        self._handles.append(block.register_forward_hook(after))

    @staticmethod
    def _keep(seen: dict, name: str, index: int | None) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            seen[name] = out[index] if index is not None else out

        return hook

    @torch.no_grad()
    def _record(self, block: nn.Module, seen: dict) -> None:
        recorder = self.recorder
        q, k = seen["q"], seen["k"]
        tokens = recorder.grid[0] * recorder.grid[1]
        image_axis = 2 if self.family == "flux" else 1
        rows = [(r, img) for r, img in enumerate(self.row_images) if img is not None and r < q.shape[0]]
        if not recorder.active or not rows or q.shape[image_axis] != tokens:
            return
        index = torch.tensor([r for r, _ in rows], device=q.device)
        q, k = q.index_select(0, index), k.index_select(0, index)
        if self.family == "flux":
            pe, text = seen["pe"], seen["txt"]
            pe = pe.index_select(0, index.to(pe.device)) if pe.shape[0] > 1 else pe
            q = apply_rope(q, pe[:, :, text:])
            k = apply_rope(k, pe[:, :, :text])
        recorder.add_qk(_tokens_last(q, self.family), _tokens_last(k, self.family), _heads(block, self.family),
                        [img for _, img in rows])
