"""FcaFormer: hybrid vision transformer with forward cross attention.

Paper: `Fcaformer: Forward Cross Attention in Hybrid Vision Transformer` (Zhang, Hu, Wang; ICCV 2023)
    - https://arxiv.org/abs/2211.07198
Official code (facts taken from it, code written here): https://github.com/hkzhang-git/FcaFormer,
    ``image_classification/models/fcaformer.py`` at 7dcd8e0e.

Two ConvNeXt stages (stride 4 and 8) then two stages of FcaBlocks (stride 16 and 32). An FcaBlock is
a ViT block whose attention also looks at *cross tokens*: every block but the last of a stage merges
its tokens with a depthwise 7x7 stride-4 conv (TME), and each later block of the stage attends to
the merged tokens of up to ``cab_max_d`` blocks before it, calibrated by learnable per-token scales,
their own LayerNorm and a per-head logit bias (LSF). A depthwise 3x3 conv (no residual) enhances the
tokens between attention and MLP. LeViT-style relative position biases and the cross-token counts
tie the attention stages to one token grid, so a model takes one input resolution (``img_size``).
"""
from __future__ import annotations

import math
import re
from functools import partial
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath, LayerNorm2d, LayerScale, NormMlpClassifierHead, calculate_drop_path_rates, to_2tuple,
    trunc_normal_, use_fused_attn,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_function
from timm.models._manipulate import checkpoint, checkpoint_seq
from timm.models.convnext import ConvNeXtBlock
from timm.models.tiny_vit import ConvNorm, NormMlp, PatchEmbed, PatchMerging

from ..errors import InputSizeError
from ._pretrained import evaluated_weights, whole_file_filter

__all__ = ["FcaFormer"]


class ForwardCrossAttention(nn.Module):
    """Multi-head attention of a block's tokens over themselves and the stage's earlier cross tokens.

    Queries come from the block's own ``N`` tokens; keys and values from those plus ``num_cross``
    cross tokens. (The official model projects queries for the cross tokens too, then drops them;
    ``q`` and ``kv`` are its ``qkv`` split in two, which skips that work.) LSF calibrates cross
    tokens from shallower blocks before they are mixed in: a learnable scale per cross token, a
    LayerNorm of their own and a learnable logit bias per head and cross token. Own tokens get
    LeViT's relative position bias (one learnt value per head and ``(|dy|, |dx|)`` offset on the
    ``resolution`` grid).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            resolution: Tuple[int, int],
            num_cross: int,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer=nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()

        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

        h, w = self.resolution = tuple(resolution)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, h * w, **dd))
        self.register_buffer(
            "attention_bias_idxs", torch.empty(h * w, h * w, device=device, dtype=torch.long), persistent=False)
        self.init_non_persistent_buffers()

        if num_cross:
            self.cross_scale = nn.Parameter(torch.ones(1, num_cross, 1, **dd))
            self.cross_norm = norm_layer(dim, **dd)
            self.cross_bias = nn.Parameter(torch.zeros(1, num_heads, 1, num_cross, **dd))
        else:  # a stage's first block has no cross tokens (None, not absent: TorchScript needs them)
            self.cross_scale = self.cross_norm = self.cross_bias = None

    def init_non_persistent_buffers(self) -> None:
        """Compute the relative position index, which the state dict does not hold: at construction, and after
        a meta-device model is materialised (timm's ``reinit_non_persistent_buffers``)."""
        h, w = self.resolution
        pos = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)
        rel = (pos[:, :, None] - pos[:, None, :]).abs()
        self.attention_bias_idxs.copy_(rel[0] * w + rel[1])

    def forward(self, x: torch.Tensor, cross: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = x.shape
        # (heads, N, N + num_cross), broadcast over the batch; a 4-D (1, heads, ...) mask derived from
        # parameters trips the ONNX exporter's attention decomposition (torch 2.15, grad mode on)
        bias = self.attention_biases[:, self.attention_bias_idxs]
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        cross_scale, cross_bias = self.cross_scale, self.cross_bias
        if cross is not None and self.cross_norm is not None and cross_scale is not None and cross_bias is not None:
            x = torch.cat((x, self.cross_norm(cross * cross_scale)), dim=1)
            bias = torch.cat((bias, cross_bias[0].expand(-1, N, -1)), dim=-1)
        k, v = self.kv(x).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class FcaBlock(nn.Module):
    """Attention over own and cross tokens, token merge (TME), local conv enhancement, MLP.

    Works on ``(B, N, C)`` tokens of a fixed ``resolution`` grid. Returns the block's output and
    its merged cross tokens for later blocks (``None`` for a stage's last block, whose would go
    unused). The MLP has its own LayerNorm after ``norm2``, as in the official model.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            resolution: Tuple[int, int],
            num_cross: int,
            merge_tokens: bool,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            ls_init_value: float = 1e-6,
            act_layer=nn.GELU,
            norm_layer=nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.resolution = resolution
        self.norm1 = norm_layer(dim, **dd)
        self.attn = ForwardCrossAttention(
            dim, num_heads, resolution, num_cross, qkv_bias=qkv_bias,
            attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer, **dd,
        )
        self.ls1 = LayerScale(dim, ls_init_value, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

        self.token_merge = nn.Conv2d(
            dim, dim, kernel_size=7, stride=4, padding=3, groups=dim, bias=False, **dd) if merge_tokens else None
        self.local_conv = ConvNorm(dim, dim, ks=3, stride=1, pad=1, groups=dim, **dd)

        self.norm2 = norm_layer(dim, **dd)
        self.mlp = NormMlp(
            dim, int(dim * mlp_ratio), norm_layer=norm_layer, act_layer=act_layer, drop=proj_drop, **dd)
        self.ls2 = LayerScale(dim, ls_init_value, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(
            self, x: torch.Tensor, cross: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        B, N, C = x.shape
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), cross)))
        x = x.transpose(1, 2).reshape(B, C, *self.resolution)
        merged = self.token_merge(x).flatten(2).transpose(1, 2) if self.token_merge is not None else None
        x = self.local_conv(x).flatten(2).transpose(1, 2)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, merged


class ConvStage(nn.Module):
    """Optional patch merging, then ConvNeXt blocks (NCHW in and out)."""

    def __init__(
            self, in_dim: int, dim: int, depth: int, downsample: bool, drop_path: List[float], ls_init_value: float,
            device=None, dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim, act_layer=nn.GELU, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            ConvNeXtBlock(dim, ls_init_value=ls_init_value, drop_path=drop_path[i], **dd) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class FcaStage(nn.Module):
    """Patch merging, then FcaBlocks sharing cross tokens (NCHW in and out).

    Block ``i`` attends to the merged tokens of blocks ``max(0, i - cab_max_d) .. i - 1``,
    oldest first, so it owns LSF parameters for ``min(i, cab_max_d)`` blocks' worth of them.
    """

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            num_heads: int,
            resolution: Tuple[int, int],
            cab_max_d: int,
            drop_path: List[float],
            device=None,
            dtype=None,
            **block_kwargs,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.cab_max_d = cab_max_d
        self.downsample = PatchMerging(in_dim, dim, act_layer=nn.GELU, **dd)
        merged_per_block = math.ceil(resolution[0] / 4) * math.ceil(resolution[1] / 4)
        self.blocks = nn.ModuleList([
            FcaBlock(
                dim, num_heads, resolution,
                num_cross=min(i, cab_max_d) * merged_per_block,
                merge_tokens=i < depth - 1,
                drop_path=drop_path[i],
                **block_kwargs,
                **dd,
            )
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        merged: List[torch.Tensor] = []
        for block in self.blocks:
            x, m = block(x, torch.cat(merged[-self.cab_max_d:], dim=1) if merged else None)
            if m is not None:
                merged.append(m)
        return x.transpose(1, 2).reshape(B, C, H, W)


# FX tracing keeps this one call (it cannot trace the comparison) and, since the input passes
# through it, feature extractors do not prune it: the traced model still checks its input.
# A public name, as FX only wraps functions without a leading underscore.
@register_notrace_function
def check_img_size(x: torch.Tensor, img_size: Tuple[int, int]) -> torch.Tensor:
    h, w = img_size
    if x.shape[-2] != h or x.shape[-1] != w:
        raise InputSizeError(
            f"FcaFormer takes {h}x{w} inputs, got {x.shape[-2]}x{x.shape[-1]}: its attention biases "
            f"and cross-token counts are learnt for one token grid. Resize and center-crop images to "
            f"{h}x{w} (timm.data.create_transform(input_size=(3, {h}, {w})) does; the pretrained cfg "
            f"keeps the variant's default input_size whatever img_size the model was created with), "
            f"or create the model with img_size=({x.shape[-2]}, {x.shape[-1]}) and train it at that size."
        )
    return x


class FcaFormer(nn.Module):
    """FcaFormer: ``len(depths) - len(num_heads)`` ConvNeXt stages, then one FcaStage per head count.

    Fixed input resolution ``img_size``; any other raises :class:`~leanvit.errors.InputSizeError`.
    The official recipe sets ``drop_path_rate`` to 0.0 / 0.1 / 0.2 / 0.4 for L1 / L2 / L3 / L4.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dims: Tuple[int, ...] = (64, 128, 192, 320),
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            num_heads: Tuple[int, ...] = (6, 10),
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            cab_max_d: int = 12,
            ls_init_value: float = 1e-6,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], act_layer=nn.GELU, **dd)
        # per-block rates rising linearly over the whole network, split by stage
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        num_conv = len(depths) - len(num_heads)
        self.stages = nn.Sequential()
        self.feature_info = []
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            in_dim = embed_dims[max(i - 1, 0)]
            stride = self.patch_embed.stride * 2 ** i
            if i < num_conv:
                stage = ConvStage(in_dim, dim, depth, i > 0, dpr[i], ls_init_value, **dd)
            else:
                # stride-2 3x3 convs with padding 1 give ceil(size / 2) at every step
                grid = tuple(math.ceil(s / stride) for s in self.img_size)
                stage = FcaStage(
                    in_dim, dim, depth, num_heads[i - num_conv], grid, cab_max_d, dpr[i],
                    mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate, ls_init_value=ls_init_value, **dd,
                )
            self.stages.append(stage)
            self.feature_info.append(dict(num_chs=dim, reduction=stride, module=f"stages.{i}"))

        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.head = NormMlpClassifierHead(
            self.num_features, num_classes, pool_type=global_pool,
            norm_layer=partial(LayerNorm2d, eps=1e-5), drop_rate=drop_rate, **dd,
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set:
        """Position and cross-token logit biases and the cross-token scales: no decay toward zero."""
        return {k for k, _ in self.named_parameters()
                if k.rsplit(".", 1)[-1] in ("attention_biases", "cross_bias", "cross_scale")}

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^head\.norm", (99999,)),
            ],
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False):
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool, reset_other=reset_other, in_features=self.num_features)
        self.head_hidden_size = self.head.num_features

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (NCHW, strides 4/8/16/32) and, unless ``intermediates_only``, the final map.

        ``indices``: last n stages if int, all if None, these stages if a sequence. There is no
        per-stage norm, so ``norm`` changes nothing.
        """
        assert output_fmt == "NCHW", "Output format must be NCHW."
        x = check_img_size(x, self.img_size)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[:max_index + 1] if stop_early else self.stages

        intermediates = []
        x = self.patch_embed(x)
        for i, stage in enumerate(stages):
            x = checkpoint(stage, x) if self.grad_checkpointing else stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last one ``indices`` takes (and the head, if asked or needed)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            # the head is sized for the last stage's width, so it goes with it
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "", reset_other=True)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = check_img_size(x, self.img_size)
        x = self.patch_embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# official name of a module inside an FcaFormer or ConvNeXt block -> ours
_BLOCK_RENAMES = {
    "dwconv": "conv_dw",
    "pwconv1": "mlp.fc1",
    "pwconv2": "mlp.fc2",
    "gamma_1": "ls1.gamma",
    "gamma_2": "ls2.gamma",
    "dw_conv": "token_merge",
    "s_token_bias": "attn.cross_bias",
    "s_norm": "attn.cross_norm",
    "s_scale_factors": "attn.cross_scale",
    "attention_biases": "attn.attention_biases",
    "qkv": "attn.qkv",
    "proj": "attn.proj",
}
_BLOCK_KEY = re.compile(r"^layer_(\d+)\.blocks\.(\d+)\.(\w+)(.*)$")
_DOWNSAMPLE_KEY = re.compile(r"^layer_(\d+)\.downsample\.(.*)$")


def _official_to_ours(key: str) -> str:
    key = re.sub(r"\.c\.weight$", ".conv.weight", key)  # official Conv2d_BN names its conv 'c'
    if m := _BLOCK_KEY.match(key):
        stage, block, name, rest = m.groups()
        return f"stages.{stage}.blocks.{block}.{_BLOCK_RENAMES.get(name, name)}{rest}"
    if m := _DOWNSAMPLE_KEY.match(key):
        # the official merges patches at the end of a layer, we do it at the start of the next stage
        return f"stages.{int(m[1]) + 1}.downsample.{m[2]}"
    key = re.sub(r"^patch_embed\.seq\.0\.", "patch_embed.conv1.", key)
    key = re.sub(r"^patch_embed\.seq\.2\.", "patch_embed.conv2.", key)
    key = re.sub(r"^norm_head\.", "head.norm.", key)
    return re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", key)


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Map an official FcaFormer checkpoint (hkzhang-git/FcaFormer) onto this implementation.

    Takes the bare state dict or a trainer's wrapper; the official (ConvNeXt-style) trainer saves
    ``{'model', 'model_ema', ...}``. The live weights come first, unlike timm's EMA-first default: the
    official evaluation (``main.py --eval true --resume ...``) loads ``model``, so that is what the
    published top-1 measures. A state dict already in our names passes through.
    """
    state_dict = evaluated_weights(state_dict)  # the live weights before the EMA
    if "patch_embed.conv1.conv.weight" in state_dict:
        return state_dict
    out = {}
    for k, v in state_dict.items():
        if k.endswith("attention_bias_idxs"):
            continue
        k = _official_to_ours(k)
        if ".attn.qkv." in k:
            dim = len(v) // 3
            out[k.replace(".qkv.", ".q.")], out[k.replace(".qkv.", ".kv.")] = v.split([dim, 2 * dim])
        else:
            out[k] = v
    return out


def _create_fcaformer(variant: str, pretrained: bool = False, **kwargs) -> FcaFormer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        FcaFormer, variant, pretrained,
        # a file goes to the filter whole: timm's file loader would hand it the EMA, not 'model'
        pretrained_filter_fn=whole_file_filter(checkpoint_filter_fn, pretrained, kwargs),
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "fixed_input_size": True,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.conv1.conv",
        "classifier": "head.fc",
        "paper_ids": "arXiv:2211.07198",
        "paper_name": "Fcaformer: Forward Cross Attention in Hybrid Vision Transformer",
        "origin_url": "https://github.com/hkzhang-git/FcaFormer",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "fcaformer_l1": _cfg(),
    "fcaformer_l2": _cfg(notes=(
        "Official ImageNet-1k weights: Baidu pan https://pan.baidu.com/s/1X8Ou539s48s3l4bX8lV2Zg "
        "(access code 1234); load with pretrained=True, pretrained_cfg_overlay=dict(file=PATH).",)),
    "fcaformer_l3": _cfg(),
    "fcaformer_l4": _cfg(),
})


@register_model
def fcaformer_l1(pretrained: bool = False, **kwargs) -> FcaFormer:
    """FcaFormer-L1 ("Micro"): 6.2M params, 1.37 GMACs, 80.3 % top-1."""
    model_args = dict(embed_dims=(64, 128, 192, 320), depths=(2, 2, 6, 2), num_heads=(6, 10))
    return _create_fcaformer("fcaformer_l1", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fcaformer_l2(pretrained: bool = False, **kwargs) -> FcaFormer:
    """FcaFormer-L2 ("Tiny"): 16.3M params, 3.6 GMACs, 83.1 % top-1."""
    model_args = dict(embed_dims=(96, 192, 320, 480), depths=(2, 2, 7, 2), num_heads=(10, 15))
    return _create_fcaformer("fcaformer_l2", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fcaformer_l3(pretrained: bool = False, **kwargs) -> FcaFormer:
    """FcaFormer-L3 ("Small"): 27.9M params, 6.7 GMACs, 84.2 % top-1."""
    model_args = dict(embed_dims=(96, 192, 320, 512), depths=(3, 6, 12, 3), num_heads=(10, 16))
    return _create_fcaformer("fcaformer_l3", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fcaformer_l4(pretrained: bool = False, **kwargs) -> FcaFormer:
    """FcaFormer-L4 ("Base"): 65.6M params, 14.5 GMACs, 84.9 % top-1."""
    model_args = dict(embed_dims=(128, 256, 512, 768), depths=(3, 6, 12, 3), num_heads=(16, 24))
    return _create_fcaformer("fcaformer_l4", pretrained=pretrained, **dict(model_args, **kwargs))
