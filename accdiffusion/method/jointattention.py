"""Word maps from joint attention (Flux, Chroma, SD 3.5): image queries against text keys.

These transformers have no cross-attention: text and image tokens attend jointly. What the
recorder needs of a block is what its attention sees: the image tokens' queries and every key,
the text's first, after qk-norm (and, for Flux/Chroma, RoPE). Forward hooks read them where the
block computes them anyway, so recording never changes a value and adds no projection:

- Flux / Chroma double-stream block (Forge backend/nn/flux.py:206-264, chroma.py:58-85):
  ``img_attn.norm`` returns the image (q, k), ``txt_attn.norm`` the text (q, k), both [B, H, L, D];
  the block's ``pe`` argument holds the rotary embedding of the sequence [text; image]
  (flux.py:240-247: the text comes first), applied inside ``attention`` (flux.py:15-18), so the
  capture applies it too (:func:`apply_rope`).
- Flux / Chroma single-stream block (flux.py:267-307, chroma.py:95-120): one ``norm`` returns
  (q, k) of the joined sequence [text; image] (the model concatenates them text first,
  flux.py:389-391): the text is as long as the ``txt`` the first double-stream block was called
  with in the same model call (a pre-hook reads it); same ``pe``.
- Z-Image / Lumina 2 (Neo's ``NextDiT``, backend/nn/lumina.py:118-189, :345-386): its main
  ``layers`` see one sequence [caption; image], the caption padded with ``cap_pad_token`` up to a
  multiple of ``pad_tokens_multiple`` and the image after it (its own pad tokens last,
  lumina.py:351-370). ``attention.q_norm`` / ``k_norm`` return q and k as [B, L, H, D] (k with
  the key heads of grouped attention, repeated per query head as the block does, :91-94); the
  block's ``freqs_cis`` argument is the rotary embedding of the whole sequence, applied as Flux's
  (lumina.py:89). The caption length is the caption embedder's output, padded as the model pads it.
  The refiner blocks (caption-only, image-only) are not recorded: they have no text share.
- Qwen-Image (Neo's ``QwenImageTransformer2DModel``, backend/nn/qwen.py:169-318, :391-483): every
  block is double-stream with one joint softmax over [text; image] (:221-234); ``attn.norm_q`` /
  ``norm_k`` return the image's q and k, ``attn.norm_added_k`` the text's k, as [B, L, H, D]; the
  block's ``image_rotary_emb`` is the rotary embedding of [text; image] as [B, L, 1, D/2, 2, 2]
  (:445), applied to the joint q and k (:226-227); the text length is the block's
  ``encoder_hidden_states``.
- Anima (Neo's ``Anima``, Cosmos-Predict2 blocks, backend/nn/anima.py:99-155, :248-368): not
  joint — image self-attention, then a **cross-attention** to the text (the LLM adapter's output,
  padded to 512 tokens, anima_engine.py:117-129); ``cross_attn.q_norm`` / ``k_norm`` return q
  [B, THW, H, D] and k [B, 512, H, D] (:122-137, no RoPE on cross-attention), so its map is the
  cross-attention softmax as a UNet's (:meth:`AttentionRecorder.add_qk`).
- Ernie-Image (Neo's ``ErnieImageModel``, backend/nn/ernie.py:97-174, :190-287): single-stream
  ``layers`` over one sequence [image; text] — the **image first** (:244), no padding, no refiners;
  ``self_attention.norm_q`` / ``norm_k`` return q and k as [B, L, H, D] (:124-125); the block's
  ``rotary_pos_emb`` argument (:159, :280) is [B, L, 1, D/2, 2, 2] (:28-47), applied in the
  split-half layout (channel k paired with k + D/2, :128; :func:`apply_rope_split_half`). The
  image is the patch grid of the model call's ``x`` (:233-235, a pre-hook on the model reads it);
  the text is the rest.
- SD 3.5 (MMDiT-X) joint block (mmditx.py:636-667): the image stream's ``x_block.attn.ln_q`` /
  ``ln_k`` and the text stream's ``context_block.attn.ln_k`` return q and k as [B, L, H, D]
  (mmditx.py:323-329, an ``nn.Identity`` when the model has no qk-norm: still called, still
  hooked); positions are added to the image tokens before the blocks (no RoPE).

What a map is (measured on the flow toy, ``python -m accdiffusion.lab.toy maps --model flow``,
docs/toy-flow.md "Which maps"): the joint softmax's **text share** as the block computes it,
softmax over all keys, text columns kept without renormalising. The text-only softmax (= the
joint softmax renormalised over the text keys) throws away how much an image token attends to
the text at all, and that is where the location is: renormalised maps peaked on their object
3-4 % of the time on the toy (below the 10 % of a random cell), the text share 42-49 %.
Which blocks: the **last quarter** of the model's blocks (:func:`recorded_blocks`) — on the toy the
late (single-stream) blocks localise best and averaging in early blocks dilutes them; for Flux
and Chroma that is single-stream blocks 23-37 of 57 blocks, for SD 3.5 large joint blocks 28-37,
medium 18-23. Per block the map costs one [image × all keys] product per head (the image rows of
the block's own attention), about +2 % of a Flux call, +3 % of SD 3.5
(``python -m accdiffusion.lab.bench --recording-cost-dit``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .attention import AttentionRecorder

RECORDED_SHARE = 0.25  # the last quarter of a model's blocks: see the module docstring


def apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, L, D] by the rotary embedding pe [B|1, 1, L, D/2, 2, 2] (Flux's EmbedND
    layout: per pair of channels the 2×2 matrix [[cos, −sin], [sin, cos]]), in float32, back in
    x's dtype; the same rotation the block's attention applies (flux.py:43-49)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
    return out.reshape(*x.shape).type_as(x)


def apply_rope_split_half(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] by pe [B|1, L, 1, D/2, 2, 2] with channel k paired with k + D/2 (the
    split-half layout of Ernie-Image's attention, ernie.py:128), in float32, back in x's dtype."""
    pairs = x.float().reshape(*x.shape[:-1], 2, -1).movedim(-2, -1).unsqueeze(-2)  # [..., D/2, 1, 2]
    out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]                    # [..., D/2, 2]
    return out.movedim(-1, -2).reshape(*x.shape).type_as(x)


def joint_family(model: nn.Module) -> str | None:
    """'flux' (double_blocks: Flux, Chroma, Flux.2 Klein), 'mmdit' (joint_blocks: SD 3 / 3.5),
    'qwen' (transformer_blocks, double-stream: Qwen-Image), 'nextdit' (single-stream ``layers``
    after caption and noise refiners: Z-Image, Lumina 2), 'anima' (blocks with cross-attention),
    'ernie' (single-stream ``layers`` over [image; text], each with a ``self_attention``:
    Ernie-Image), or None."""
    if isinstance(getattr(model, "double_blocks", None), nn.ModuleList):
        return "flux"
    if isinstance(getattr(model, "joint_blocks", None), nn.ModuleList):
        return "mmdit"
    if isinstance(getattr(model, "transformer_blocks", None), nn.ModuleList) and hasattr(model, "txt_norm"):
        return "qwen"
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks) and hasattr(blocks[0], "cross_attn"):
        return "anima"
    if (isinstance(getattr(model, "layers", None), nn.ModuleList) and hasattr(model, "cap_embedder")
            and hasattr(model, "noise_refiner")):
        return "nextdit"
    layers = getattr(model, "layers", None)
    if (isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "self_attention")
            and hasattr(model, "x_embedder") and hasattr(model, "patch_size")):
        return "ernie"
    return None


def all_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's attention blocks in the order it runs them."""
    family = joint_family(model)
    if family == "flux":
        return list(model.double_blocks) + list(getattr(model, "single_blocks", None) or [])
    if family == "mmdit":
        return list(model.joint_blocks)
    if family in ("nextdit", "ernie"):
        return list(model.layers)
    if family == "qwen":
        return list(model.transformer_blocks)
    if family == "anima":
        return list(model.blocks)
    raise ValueError(f"{type(model).__name__} is not a joint-attention transformer this recorder knows")


def late_block_count(total: int, share: float = RECORDED_SHARE) -> int:
    """How many of ``total`` blocks, counted from the last, are recorded (at least one)."""
    return max(1, math.ceil(total * share))


def recorded_blocks(model: nn.Module) -> list[nn.Module]:
    blocks = all_blocks(model)
    return blocks[len(blocks) - late_block_count(len(blocks)):]


def _block_kind(block: nn.Module, family: str) -> str:
    if family in ("mmdit", "nextdit", "qwen", "anima", "ernie"):
        return family
    return "double" if hasattr(block, "img_attn") else "single"


def _heads(block: nn.Module, kind: str) -> int:
    if kind == "nextdit":
        return int(block.attention.n_local_heads)
    if kind == "qwen":
        return int(block.attn.heads)
    if kind == "anima":
        return int(block.cross_attn.n_heads)
    if kind == "ernie":
        return int(block.self_attention.heads)
    return int(block.x_block.attn.num_heads if kind == "mmdit" else block.num_heads)


def padded_caption_length(model: nn.Module, length: int) -> int:
    """The caption's length in a NextDiT sequence: padded up to ``pad_tokens_multiple`` (lumina.py:351)."""
    multiple = getattr(model, "pad_tokens_multiple", None)
    return length + (-length % multiple if multiple else 0)


def _tokens_last(t: torch.Tensor, kind: str) -> torch.Tensor:
    """[B, H, L, D] (flux blocks) or [B, …, L, H, D] (the others; Anima's text keys keep the
    prompt's own axis, [B, 1, 512, H, D]) -> [B, L, H·D], as the recorder takes them."""
    if kind not in ("mmdit", "nextdit", "qwen", "anima", "ernie"):
        t = t.transpose(1, 2)
    return t.reshape(t.shape[0], -1, t.shape[-2] * t.shape[-1])


class JointAttentionCapture:
    """While entered, the chosen blocks of ``model`` feed ``recorder`` with the image-query
    attention's text share (:meth:`AttentionRecorder.add_joint_qk`) of the rows ``row_images``
    marks (the image of each batch row, or None for a row that is not a positive prompt). Hooks
    are removed on exit, also on error."""

    def __init__(self, model: nn.Module, recorder: AttentionRecorder, row_images: Sequence[int | None],
                 blocks: Sequence[nn.Module] | None = None, trailing_tokens: int = 0):
        family = joint_family(model)
        if family is None:
            raise ValueError(f"{type(model).__name__} is not a joint-attention transformer this recorder knows")
        self.family: str = family
        self.recorder = recorder
        self.row_images = list(row_images)
        self.blocks = list(blocks) if blocks is not None else recorded_blocks(model)
        self._handles: list[Any] = []
        self._model = model
        self._text: dict[str, int] = {}  # the text length of the current call (single-stream blocks)
        # reference-image tokens the model appends after the image's own (Neo's Flux.2 Klein / Kontext /
        # Qwen edit, flux.py:583-611): attended to, but not a part of the picture's grid
        self.trailing_tokens = trailing_tokens

    def __enter__(self) -> "JointAttentionCapture":
        try:
            if self.family == "flux" and len(self._model.double_blocks):
                # a single-stream block sees [text; image] joined: its text length is the one the
                # first double-stream block was called with (flux.py:388-391)
                def text_length(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                    self._text["txt"] = int((kwargs["txt"] if "txt" in kwargs else args[1]).shape[1])

                self._handles.append(self._model.double_blocks[0].register_forward_pre_hook(text_length,
                                                                                           with_kwargs=True))
            if self.family == "nextdit":
                def caption_length(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
                    self._text["txt"] = padded_caption_length(self._model, int(out.shape[1]))

                self._handles.append(self._model.cap_embedder.register_forward_hook(caption_length))
            if self.family == "ernie":
                # the image comes first in the sequence: its length is the call's patch grid (ernie.py:233-235)
                def image_length(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                    x = kwargs["x"] if "x" in kwargs else args[0]
                    patch = int(self._model.patch_size)
                    self._text["image"] = (int(x.shape[-2]) // patch) * (int(x.shape[-1]) // patch)

                self._handles.append(self._model.register_forward_pre_hook(image_length, with_kwargs=True))
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
        kind = _block_kind(block, self.family)
        hook = self._handles.append
        if kind == "double":
            def before(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                seen["pe"] = kwargs["pe"] if "pe" in kwargs else args[3]
                seen["txt"] = int((kwargs["txt"] if "txt" in kwargs else args[1]).shape[1])

            hook(block.register_forward_pre_hook(before, with_kwargs=True))
            hook(block.img_attn.norm.register_forward_hook(self._keep(seen, ("q", "k_img"))))
            hook(block.txt_attn.norm.register_forward_hook(self._keep(seen, (None, "k_txt"))))
        elif kind == "single":
            def before(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                seen["pe"] = kwargs["pe"] if "pe" in kwargs else args[2]
                if "txt" in self._text:
                    seen["txt"] = self._text["txt"]

            hook(block.register_forward_pre_hook(before, with_kwargs=True))
            hook(block.norm.register_forward_hook(self._keep(seen, ("q_all", "k_all"))))
        elif kind == "nextdit":
            def before(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                seen["pe"] = kwargs["freqs_cis"] if "freqs_cis" in kwargs else args[2]
                if "txt" in self._text:
                    seen["txt"] = self._text["txt"]

            hook(block.register_forward_pre_hook(before, with_kwargs=True))
            hook(block.attention.q_norm.register_forward_hook(self._keep(seen, "q_all")))
            hook(block.attention.k_norm.register_forward_hook(self._keep(seen, "k_all")))
        elif kind == "ernie":
            def before(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                seen["pe"] = kwargs["rotary_pos_emb"] if "rotary_pos_emb" in kwargs else args[1]
                if "image" in self._text:
                    seen["image_tokens"] = self._text["image"]

            hook(block.register_forward_pre_hook(before, with_kwargs=True))
            hook(block.self_attention.norm_q.register_forward_hook(self._keep(seen, "q_all")))
            hook(block.self_attention.norm_k.register_forward_hook(self._keep(seen, "k_all")))
        elif kind == "anima":
            hook(block.cross_attn.q_norm.register_forward_hook(self._keep(seen, "q")))
            hook(block.cross_attn.k_norm.register_forward_hook(self._keep(seen, "k_txt")))
        elif kind == "qwen":
            def before(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                seen["pe"] = kwargs["image_rotary_emb"] if "image_rotary_emb" in kwargs else args[4]
                seen["txt"] = int((kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs
                                   else args[1]).shape[1])

            hook(block.register_forward_pre_hook(before, with_kwargs=True))
            hook(block.attn.norm_q.register_forward_hook(self._keep(seen, "q")))
            hook(block.attn.norm_k.register_forward_hook(self._keep(seen, "k_img")))
            hook(block.attn.norm_added_k.register_forward_hook(self._keep(seen, "k_txt")))
        else:
            hook(block.x_block.attn.ln_q.register_forward_hook(self._keep(seen, "q")))
            hook(block.x_block.attn.ln_k.register_forward_hook(self._keep(seen, "k_img")))
            hook(block.context_block.attn.ln_k.register_forward_hook(self._keep(seen, "k_txt")))

        def after(_m: nn.Module, _args: tuple, _out: Any) -> None:
            try:
                self._record(block, kind, seen)
            finally:
                seen.clear()

        hook(block.register_forward_hook(after))

    @staticmethod
    def _keep(seen: dict, names: str | tuple[str | None, ...]) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            if isinstance(names, str):
                seen.setdefault(names, out)  # the first call: MMDiT-X's attn2 has norms of its own
            else:
                for name, value in zip(names, out):
                    if name is not None:
                        seen[name] = value

        return hook

    def _image_tokens(self, kind: str, seen: dict) -> int | None:
        if kind == "single":
            if "q_all" not in seen or "txt" not in seen:
                return None
            return seen["q_all"].shape[2] - seen["txt"] - self.trailing_tokens
        if kind == "nextdit":
            # the image's own pad tokens follow it (lumina.py:367-370): the grid must fit before them
            if "q_all" not in seen or "txt" not in seen:
                return None
            grid = self.recorder.grid[0] * self.recorder.grid[1]
            room = seen["q_all"].shape[1] - seen["txt"]
            pad_limit = getattr(self._model, "pad_tokens_multiple", None) or 1
            return grid if grid <= room < grid + pad_limit else room
        if kind == "ernie":
            return seen.get("image_tokens") if "q_all" in seen else None
        if "q" not in seen:
            return None
        count = int(seen["q"].shape[1 if kind in ("mmdit", "qwen", "anima") else 2])
        return count - self.trailing_tokens if kind in ("double", "qwen") else count

    @staticmethod
    def _queries_and_keys(kind: str, seen: dict, index: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """(image queries, all keys with the text's first, text length) of the batch rows ``index``,
        in the block's layout, RoPE applied as the block's attention applies it."""
        def rows(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, index.to(t.device)) if t.shape[0] > 1 else t

        if kind == "single":
            if "q_all" not in seen or "txt" not in seen:
                return None
            q, k, pe = rows(seen["q_all"]), rows(seen["k_all"]), rows(seen["pe"])
            text, image = seen["txt"], seen["image"]
            return apply_rope(q[:, :, text:text + image], pe[:, :, text:text + image]), apply_rope(k, pe), text
        if kind == "nextdit":
            if not all(name in seen for name in ("q_all", "k_all", "pe", "txt")):
                return None
            q, k, pe = rows(seen["q_all"]), rows(seen["k_all"]), rows(seen["pe"])
            text, image = seen["txt"], seen["image"]
            k = apply_rope(k, pe)
            if k.shape[2] != q.shape[2]:  # grouped keys: each key head serves consecutive query heads
                k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
            return apply_rope(q[:, text:text + image], pe[:, text:text + image]), k, text
        if kind == "ernie":
            if not all(name in seen for name in ("q_all", "k_all", "pe")):
                return None
            q, k, pe = rows(seen["q_all"]), rows(seen["k_all"]), rows(seen["pe"])
            image = seen["image"]
            k = apply_rope_split_half(k, pe)
            # the recorder takes the text's keys first: [image; text] -> [text; image]
            keys = torch.cat([k[:, image:], k[:, :image]], 1)
            return apply_rope_split_half(q[:, :image], pe[:, :image]), keys, int(k.shape[1]) - image
        if not all(name in seen for name in ("q", "k_img", "k_txt")):
            return None
        q, k_img, k_txt = rows(seen["q"]), rows(seen["k_img"]), rows(seen["k_txt"])
        image = seen["image"]
        if kind == "qwen":
            pe, text = rows(seen["pe"]), seen["txt"]
            return (apply_rope(q[:, :image], pe[:, text:text + image]),
                    torch.cat([apply_rope(k_txt, pe[:, :text]), apply_rope(k_img, pe[:, text:])], 1), text)
        if kind == "double":
            pe, text = rows(seen["pe"]), seen["txt"]
            return (apply_rope(q[:, :, :image], pe[:, :, text:text + image]),
                    torch.cat([apply_rope(k_txt, pe[:, :, :text]), apply_rope(k_img, pe[:, :, text:])], 2), text)
        return q, torch.cat([k_txt, k_img], 1), int(k_txt.shape[1])

    @torch.no_grad()
    def _record(self, block: nn.Module, kind: str, seen: dict) -> None:
        recorder = self.recorder
        batch = next((t.shape[0] for name in ("q", "q_all") if (t := seen.get(name)) is not None), 0)
        rows = [(r, img) for r, img in enumerate(self.row_images) if img is not None and r < batch]
        if not recorder.active or not rows:
            return
        if self._image_tokens(kind, seen) != recorder.grid[0] * recorder.grid[1]:
            return  # a window or sub-latent of another size (a tiler's tile): not the first pass's grid
        seen["image"] = recorder.grid[0] * recorder.grid[1]
        if kind == "anima":  # cross-attention: the softmax over the text alone
            if "k_txt" not in seen:
                return
            index = torch.tensor([r for r, _ in rows], device=seen["q"].device)
            q = seen["q"].index_select(0, index) if seen["q"].shape[0] > 1 else seen["q"]
            k = seen["k_txt"].index_select(0, index) if seen["k_txt"].shape[0] > 1 else seen["k_txt"]
            if k.shape[0] != q.shape[0]:
                k = k.expand(q.shape[0], *k.shape[1:])
            recorder.add_qk(_tokens_last(q, kind), _tokens_last(k, kind), _heads(block, kind), [img for _, img in rows])
            return
        found = self._queries_and_keys(kind, seen, torch.tensor([r for r, _ in rows]))
        if found is None:
            return
        q, keys, text = found
        recorder.add_joint_qk(_tokens_last(q, kind), _tokens_last(keys, kind), _heads(block, kind),
                              [img for _, img in rows], text)
