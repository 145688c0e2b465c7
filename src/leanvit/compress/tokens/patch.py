"""Token reduction inside timm's ``VisionTransformer``: the part EViT, ToMe and DiffRate share.

All three methods act at the same place, between a block's attention and its MLP, and each needs
something timm's fused attention does not return: the class token's attention row (EViT,
DiffRate) or the keys (ToMe), and for merging methods a log-size bias on the attention logits
(ToMe's proportional attention). Rather than swapping module classes, :func:`apply` replaces
``model.blocks`` with :class:`ReducingBlocks`, an ``nn.Sequential`` over the *same* block modules, so
``state_dict`` keys and checkpoints are unchanged. Its forward passes the token sizes from block to
block. :func:`remove` puts the original ``nn.Sequential`` back. Reduction applies to ``forward`` and
``forward_features``. What timm runs block by block runs the original blocks, unreduced:
``forward_intermediates`` (spatial feature maps need every token) and a forward with ``attn_mask`` or
``is_causal`` (a mask over every token: ``model(x, attn_mask=...)`` warns that it runs unreduced; a direct
``forward_features(x, attn_mask=...)`` call cannot be seen and does not); ``prune_intermediate_layers`` keeps the
original blocks, so the pruned model is unreduced (:func:`applied` then returns None).

Every token count is a Python integer derived from the input's token count, never from data, so a
reduced model is top-k, gather and scatter-add with fixed shapes, and it exports to ONNX and
OpenVINO as such.
"""
from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from ...errors import LeanvitError, LeanvitWarning

#: ``reduce(x, size, metric) -> (x, size)``: one block's reduction, applied after its attention.
#: ``x`` is (B, N, C); ``size`` (B, N, 1) counts the patches each token stands for, or is None
#: while every token is a single patch; ``metric`` is what the method asked the attention for.
Reducer = Callable[[torch.Tensor, Optional[torch.Tensor], torch.Tensor], tuple]


class TokenMethod(ABC):
    """A token-reduction method: per-block reducers plus what they need from the attention.

    ``metric`` is ``"cls_attn"`` (head-mean attention of the class token to every token, (B, N))
    or ``"keys"`` (head-mean keys, (B, N, head_dim)). ``proportional`` adds log(size) to the
    attention logits so that a merged token keeps the weight of the patches it replaced.
    """

    metric: str = "cls_attn"
    proportional: bool = False

    @abstractmethod
    def reducers(self, depth: int, num_prefix: int) -> list[Reducer | None]:
        """One reducer per block (None: the block keeps its tokens); raises if ``self`` cannot fit."""

    @abstractmethod
    def token_counts(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        """Tokens left after each block's reduction, for an input of ``num_tokens`` tokens."""

    def resolve(self, model: VisionTransformer) -> TokenMethod:
        """The method with everything it learns from ``model`` fixed (DiffRate searches here)."""
        return self


def attend(
    attn: Attention, x: torch.Tensor, size: torch.Tensor | None, metric: str | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """timm ``Attention.forward`` plus the reduction ``metric``, with an optional log-size bias.

    Without a size bias the output stays on fused SDPA, and the class token's attention row is
    recomputed on its own (one query, negligible cost) because SDPA returns no weights. With a bias
    the attention is written out: SDPA with a float mask does not survive ``torch.export``'s
    decomposition, and the weights are then at hand.
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    cls_attn = None
    if size is None:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
        if metric == "cls_attn":
            cls_attn = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0].mean(dim=1)
    else:
        w = ((q * attn.scale) @ k.transpose(-2, -1) + size.log().view(B, 1, 1, N)).softmax(dim=-1)
        cls_attn = w[:, :, 0].mean(dim=1)
        out = attn.attn_drop(w) @ v
    out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim))
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    if metric == "keys":
        return out, k.mean(dim=1)
    return out, cls_attn if metric == "cls_attn" else None


def block_forward(
    blk: Block, x: torch.Tensor, size: torch.Tensor | None, reduce: Reducer | None, method: TokenMethod
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """timm ``Block.forward`` with ``reduce`` between the attention and the MLP."""
    h, metric = attend(blk.attn, blk.norm1(x), size if method.proportional else None,
                       method.metric if reduce is not None else None)
    x = x + blk.drop_path1(blk.ls1(h))
    if reduce is not None:
        x, size = reduce(x, size, metric)
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, size


class ReducingBlocks(nn.Sequential):
    """``model.blocks`` with a token-reduction method applied; same children, same state_dict."""

    def __init__(self, blocks: nn.Sequential, method: TokenMethod, num_prefix: int) -> None:
        super().__init__(*blocks)
        self.num_prefix = num_prefix
        self.__dict__["original"] = blocks  # kept out of the module tree: the children are shared
        self.set_method(method)

    def set_method(self, method: TokenMethod) -> None:
        """Switch to ``method`` (same model), for training and evaluation; clears any :meth:`set_train_method`."""
        self.method = method
        self.__dict__["_reducers"] = method.reducers(len(self), self.num_prefix)
        self.set_train_method(None)

    def set_train_method(self, method: TokenMethod | None) -> None:
        """Use ``method`` in training mode only; evaluation keeps :attr:`method` (None: ``method`` in both).

        EViT's keep-rate warm-up calls this every step with the scheduled rate: an evaluation during the
        warm-up runs at the target, the model as it will run (official EViT evaluates at the scheduled rate).
        """
        self.__dict__["train_method"] = method
        self.__dict__["_train_reducers"] = None if method is None else method.reducers(len(self), self.num_prefix)

    def __getitem__(self, idx):
        """Blocks of the original model: timm slices ``blocks`` (``forward_intermediates``,
        ``prune_intermediate_layers``) to run them one by one, which is the unreduced path."""
        return self.original[idx]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        method, reducers = self.method, self._reducers
        if self.training and self.train_method is not None:
            method, reducers = self.train_method, self._train_reducers
        size = None
        for blk, reduce in zip(self, reducers):
            x, size = block_forward(blk, x, size, reduce, method)
        return x

    def extra_repr(self) -> str:
        train = f", train_method={self.train_method!r}" if self.train_method is not None else ""
        return f"method={self.method!r}{train}"


def check_plain_vit(model: nn.Module) -> VisionTransformer:
    """Reject anything but a timm ``VisionTransformer`` of standard blocks, read through a class token."""
    name = type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise LeanvitError(
            f"Token reduction works on plain ViTs (timm VisionTransformer: DeiT, ViT), not {name}. "
            "Pick a model such as deit_small_patch16_224 or vit_base_patch16_224."
        )
    blocks = model.blocks.original if isinstance(model.blocks, ReducingBlocks) else model.blocks
    odd = {type(b).__name__ if type(b) is not Block else f"Block with {type(b.attn).__name__}"
           for b in blocks if type(b) is not Block or type(b.attn) is not Attention}
    if type(blocks) is not nn.Sequential or odd:
        raise LeanvitError(
            f"{name} has non-standard transformer blocks ({', '.join(sorted(odd)) or type(blocks).__name__}); "
            "token reduction needs timm's Block with its Attention. Use a DeiT/ViT model."
        )
    if model.cls_token is None or model.global_pool != "token" or getattr(model, "attn_pool", None) is not None:
        raise LeanvitError(
            f"{name} pools with '{model.global_pool}' rather than reading a class token; EViT, ToMe "
            "and DiffRate keep the class token and drop or merge the others. Use a class-token ViT "
            "(global_pool='token'), e.g. deit_small_patch16_224."
        )
    return model


def model_tokens(model: VisionTransformer) -> int:
    """Tokens entering the first block at the model's configured input size."""
    return model.patch_embed.num_patches + model.num_prefix_tokens


def _check_reduced_call(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Before a reduced model's forward: the calls timm runs block by block would skip the reduction."""
    if not isinstance(model.blocks, ReducingBlocks):
        return  # pruned (prune_intermediate_layers): the original blocks, unreduced by design
    if getattr(model, "grad_checkpointing", False):
        raise LeanvitError(
            "Gradient checkpointing runs the blocks one by one and would skip the token reduction; "
            "call model.set_grad_checkpointing(False) while leanvit.tokens is applied."
        )
    masked = kwargs.get("attn_mask", args[1] if len(args) > 1 else None) is not None
    if masked or kwargs.get("is_causal", args[2] if len(args) > 2 else False):
        warnings.warn(f"{type(model).__name__} ran without its token reduction ({model.blocks.method!r}): an "
                      "attention mask or causal attention covers every token, so timm runs the original blocks. "
                      "Call it without attn_mask / is_causal for the reduced model.", LeanvitWarning, stacklevel=3)


def apply(model: nn.Module, method: TokenMethod) -> nn.Module:
    """Apply ``method`` to ``model`` in place (replacing any reduction already applied); returns it.

    DiffRate's rate search, if the method asks for one, runs here on the unreduced model. A method
    that does not fit the model raises :class:`LeanvitError` and leaves the model unreduced.
    """
    if not isinstance(method, TokenMethod):
        raise LeanvitError(
            f"Expected a token method (EViT, ToMe, DiffRate or from_spec('evit:0.7')), got {method!r}."
        )
    model = remove(check_plain_vit(model))
    method = method.resolve(model)
    method.token_counts(model_tokens(model), model.num_prefix_tokens, len(model.blocks))  # validates
    model.blocks = ReducingBlocks(model.blocks, method, model.num_prefix_tokens)
    model.register_forward_pre_hook(_check_reduced_call, with_kwargs=True)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model gets its original ``blocks`` back. A no-op on unpatched models."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, ReducingBlocks):
        model.blocks = blocks.original
        # found by identity, not by handle, so that a deep-copied model removes its own hook
        for key in [k for k, h in model._forward_pre_hooks.items() if h is _check_reduced_call]:
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
    return model


def applied(model: nn.Module) -> TokenMethod | None:
    """The token method applied to ``model``, or None."""
    blocks = getattr(model, "blocks", None)
    return blocks.method if isinstance(blocks, ReducingBlocks) else None


def token_counts(model: nn.Module, num_tokens: int | None = None) -> list[int]:
    """Tokens after each block of a reduced ``model`` (at its configured input size by default)."""
    method = applied(model)
    if method is None:
        raise LeanvitError("No token reduction is applied to this model; call leanvit.tokens.apply first.")
    return method.token_counts(num_tokens or model_tokens(model), model.num_prefix_tokens, len(model.blocks))


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b, j]]`` for (B, N, C) ``x`` and (B, K) ``idx``."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
