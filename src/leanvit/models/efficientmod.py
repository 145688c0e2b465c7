"""EfficientMod: efficient modulation networks.

Paper: `Efficient Modulation for Vision Networks` (Ma, Dai, Hu, Chen, Fu, Yuan, Yuan; ICLR 2024)
- https://arxiv.org/abs/2403.19963
Official code (the architecture and checkpoint names follow it): https://github.com/ma-xu/EfficientMod

The modulation block replaces attention with an element-wise product: a cheap context branch
(linear -> depthwise 7x7 -> GELU -> linear, at the block's width C) modulates the r-times wider
output of a linear projection, and a second linear maps back to C. That is one MLP's worth of
dense matmuls plus a depthwise conv, which CPUs and GPUs run near peak. The three hybrid variants
append plain ViT blocks to stages 3 and 4; ``efficientmod_s_conv`` is convolutional throughout.
The whole network runs channels-last (NHWC), with LayerNorm, as the official one does.
"""
from __future__ import annotations

import re
from typing import List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerScale, Mlp, calculate_drop_path_rates, get_device_dtype, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..errors import LeanvitError
from ._pretrained import evaluated_weights, whole_file_filter

__all__ = ['EfficientMod']


def _to_nchw(x: torch.Tensor) -> torch.Tensor:
    """NHWC -> NCHW for a conv, as a view with channels-last strides, which oneDNN's channels-last
    convolutions take without a copy. Under ``torch.export`` the view is made contiguous: export
    cannot keep the batch dimension dynamic through a conv whose input has channels-last strides
    (it fixes it to 1)."""
    x = x.permute(0, 3, 1, 2)
    if not torch.jit.is_scripting():  # a static branch: TorchScript cannot compile is_exporting
        if torch.compiler.is_exporting():
            return x.contiguous()
    return x


class Stem(nn.Module):
    """Conv 7x7 stride 4 + LayerNorm: NCHW image in, NHWC features out."""

    def __init__(self, in_chs: int, out_chs: int, norm_layer: Type[nn.Module] = nn.LayerNorm, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 7, stride=4, padding=3, **dd)
        self.norm = norm_layer(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class Downsample(nn.Module):
    """Conv 3x3 stride 2 + LayerNorm, NHWC in and out."""

    def __init__(self, in_chs: int, out_chs: int, norm_layer: Type[nn.Module] = nn.LayerNorm, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1, **dd)
        self.norm = norm_layer(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(_to_nchw(x)).permute(0, 2, 3, 1))


class ContextBranch(nn.Module):
    """Linear -> depthwise conv -> act -> linear: the spatial context that modulates, NHWC."""

    def __init__(self, dim: int, kernel_size: int = 7, act_layer: Type[nn.Module] = nn.GELU, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.f = nn.Linear(dim, dim, **dd)
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, **dd)
        self.act = act_layer()
        self.g = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv(_to_nchw(self.f(x)))).permute(0, 2, 3, 1)
        return self.g(x)


class Modulation(nn.Module):
    """``fc2(act(fc1(x)) * context(x))`` with the C-wide context tiled over the rC-wide projection.

    The official code tiles the context with ``repeat`` along channels; broadcasting over an
    (r, C) view of the projection computes the same product without materialising the copies.
    With r = 1 the official block skips the activation after ``fc1``, and so does this one.
    """

    def __init__(
            self,
            dim: int,
            mlp_ratio: int,
            kernel_size: int = 7,
            act_layer: Type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.ratio = mlp_ratio
        self.fc1 = nn.Linear(dim, dim * mlp_ratio, **dd)
        self.act = act_layer() if mlp_ratio > 1 else nn.Identity()
        self.context = ContextBranch(dim, kernel_size, act_layer=act_layer, **dd)
        self.fc2 = nn.Linear(dim * mlp_ratio, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.context(x)
        x = self.act(self.fc1(x))
        x = (x.unflatten(-1, (self.ratio, -1)) * ctx.unsqueeze(-2)).flatten(-2)
        return self.fc2(x)


class EfficientModBlock(nn.Module):
    """``x + gamma * Modulation(LN(x))``, NHWC."""

    def __init__(
            self,
            dim: int,
            mlp_ratio: int,
            kernel_size: int = 7,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            layer_scale_init_value: float = 1e-4,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm = norm_layer(dim, **dd)
        self.mlp = Modulation(dim, mlp_ratio, kernel_size, act_layer=act_layer, **dd)
        self.ls = LayerScale(dim, layer_scale_init_value, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.ls(self.mlp(self.norm(x))))


class Attention(nn.Module):
    """Multi-head self-attention whose head width is at least 32, so it may differ from dim / heads."""

    def __init__(self, dim: int, num_heads: int = 8, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = max(dim // num_heads, 32)
        attn_dim = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * attn_dim, bias=False, **dd)
        self.proj = nn.Linear(attn_dim, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, -1))


class AttentionBlock(nn.Module):
    """Pre-norm ViT block (no layer scale) on the NHWC map flattened to tokens."""

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.,
            num_heads: int = 8,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm1 = norm_layer(dim, **dd)
        self.attn = Attention(dim, num_heads, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)


class EfficientModStage(nn.Module):
    """Optional downsample, ``depth`` modulation blocks, then ``attn_depth`` attention blocks."""

    def __init__(
            self,
            dim: int,
            dim_out: int,
            depth: int,
            attn_depth: int = 0,
            mlp_ratios: Tuple[int, ...] = (1, 6),
            attn_mlp_ratio: float = 4.,
            num_heads: int = 8,
            kernel_size: int = 7,
            downsample: bool = True,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            layer_scale_init_value: float = 1e-4,
            drop_path: Tuple[float, ...] = (),
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = Downsample(dim, dim_out, norm_layer, **dd) if downsample else nn.Identity()
        blocks = [
            EfficientModBlock(
                dim_out,
                mlp_ratio=mlp_ratios[i % len(mlp_ratios)],
                kernel_size=kernel_size,
                act_layer=act_layer,
                norm_layer=norm_layer,
                layer_scale_init_value=layer_scale_init_value,
                drop_path=drop_path[i],
                **dd,
            ) for i in range(depth)
        ]
        blocks += [
            AttentionBlock(
                dim_out,
                mlp_ratio=attn_mlp_ratio,
                num_heads=num_heads,
                act_layer=act_layer,
                norm_layer=norm_layer,
                drop_path=drop_path[depth + j],
                **dd,
            ) for j in range(attn_depth)
        ]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class EfficientMod(nn.Module):
    """EfficientMod: four stages of modulation blocks (plus attention blocks), NHWC throughout.

    ``forward_features`` returns the final-normed NHWC map (``output_fmt = 'NHWC'``, like timm's
    MambaOut); ``forward_intermediates`` returns NCHW maps unless asked for NHWC.
    """

    def __init__(
            self,
            embed_dims: Tuple[int, ...] = (32, 64, 128, 256),
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            attn_depths: Tuple[int, ...] = (0, 0, 1, 2),
            mlp_ratios: Tuple[int, ...] = (1, 6),
            attn_mlp_ratios: Tuple[float, ...] = (4, 4, 4, 4),
            num_heads: int = 8,
            kernel_size: int = 7,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            layer_scale_init_value: float = 1e-4,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            embed_dims: Width of each stage.
            depths: Modulation blocks per stage.
            attn_depths: Attention blocks appended to each stage.
            mlp_ratios: Expansion r of successive modulation blocks, cycled within every stage.
            attn_mlp_ratios: MLP expansion of each stage's attention blocks.
            num_heads: Attention heads; the head width is max(dim // num_heads, 32).
            kernel_size: Depthwise kernel of the context branch.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        _check_global_pool(global_pool)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.output_fmt = 'NHWC'

        self.stem = Stem(in_chans, embed_dims[0], norm_layer, **dd)
        self.num_stages = len(depths)
        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths) + sum(attn_depths))
        stages = []
        self.feature_info = []
        prev_dim = embed_dims[0]
        start = 0
        for i, dim in enumerate(embed_dims):
            n_blocks = depths[i] + attn_depths[i]
            stages.append(EfficientModStage(
                prev_dim,
                dim,
                depths[i],
                attn_depth=attn_depths[i],
                mlp_ratios=mlp_ratios,
                attn_mlp_ratio=attn_mlp_ratios[i],
                num_heads=num_heads,
                kernel_size=kernel_size,
                downsample=i > 0,
                act_layer=act_layer,
                norm_layer=norm_layer,
                layer_scale_init_value=layer_scale_init_value,
                drop_path=dpr[start:start + n_blocks],
                **dd,
            ))
            start += n_blocks
            prev_dim = dim
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2), module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.norm = norm_layer(self.num_features, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Nothing beyond timm's default (biases, norms and the 1-d layer scales skip decay)."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        if global_pool is not None:
            _check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes, **get_device_dtype(self)) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that also returns the outputs of the stages at ``indices``.

        Args:
            x: Input image tensor.
            indices: Take last n stages if int, all if None, the listed ones if a sequence.
            norm: Apply the final norm to the last stage's intermediate.
            stop_early: Stop after the last stage that ``indices`` asks for.
            output_fmt: 'NCHW' or 'NHWC' (the layout the network computes in).
            intermediates_only: Return only the intermediates.
        """
        assert output_fmt in ('NCHW', 'NHWC'), 'Output format must be NCHW or NHWC.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = self.num_stages - 1
        x = self.stem(x)
        if torch.jit.is_scripting() or not stop_early:  # can't slice stages in torchscript
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        feat_idx = 0
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                y = self.norm(x) if norm and feat_idx == last_idx else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else y)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last one ``indices`` asks for (and the norm and head with them)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for, and only applied to, the final stage
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean((1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_global_pool(global_pool: str) -> None:
    if global_pool not in ('', 'avg'):
        raise LeanvitError(f"EfficientMod supports global_pool='avg' or '' (no pooling), got {global_pool!r}.")


def checkpoint_filter_fn(state_dict: dict, model: EfficientMod) -> dict:
    """Map an official ma-xu/EfficientMod checkpoint onto this implementation.

    The official trainer (its ``CheckpointSaver._save``) saves ``{'state_dict', 'state_dict_ema', ...}``.
    The live weights come first, unlike timm's EMA-first default: the official evaluation
    (``validate.py --checkpoint ...``, ``--use-ema`` off) loads ``state_dict``, so that is what the
    published top-1 measures. Officially each stage (``layers.s``) ends with the downsample into the
    next one, here each stage starts with it.
    """
    state_dict = evaluated_weights(state_dict)  # the live weights before the EMA
    if 'stem.conv.weight' in state_dict:
        return state_dict  # already in this implementation's names

    renames = [
        (r'^patch_embed\.proj\.', 'stem.conv.'),
        (r'^patch_embed\.norm\.', 'stem.norm.'),
        (r'^layers\.(\d+)\.downsample\.proj\.', lambda m: f'stages.{int(m[1]) + 1}.downsample.conv.'),
        (r'^layers\.(\d+)\.downsample\.norm\.', lambda m: f'stages.{int(m[1]) + 1}.downsample.norm.'),
        (r'^layers\.(\d+)\.blocks\.', r'stages.\1.blocks.'),
        (r'\.mlp\.context_layer\.context_list\.0\.', '.mlp.context.conv.'),
        (r'\.mlp\.context_layer\.', '.mlp.context.'),
        (r'\.gamma_1$', '.ls.gamma'),
    ]
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in renames:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def _create_efficientmod(variant: str, pretrained: bool = False, **kwargs) -> EfficientMod:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_cfg(
        EfficientMod, variant, pretrained,
        # a file goes to the filter whole: timm's file loader would hand it the EMA, not 'state_dict'
        pretrained_filter_fn=whole_file_filter(checkpoint_filter_fn, pretrained, kwargs),
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


#: Registered variants; their published numbers are in ``leanvit.catalog``.
VARIANTS = ('efficientmod_xxs', 'efficientmod_xs', 'efficientmod_s', 'efficientmod_s_conv')


def _cfg(**kwargs) -> dict:
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv', 'classifier': 'head',
        'paper_ids': 'arXiv:2403.19963', 'origin_url': 'https://github.com/ma-xu/EfficientMod',
        'license': 'apache-2.0',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in VARIANTS})


@register_model
def efficientmod_xxs(pretrained: bool = False, **kwargs) -> EfficientMod:
    model_args = dict(
        embed_dims=(32, 64, 128, 256), depths=(2, 2, 6, 2), attn_depths=(0, 0, 1, 2), mlp_ratios=(1, 6))
    return _create_efficientmod('efficientmod_xxs', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def efficientmod_xs(pretrained: bool = False, **kwargs) -> EfficientMod:
    model_args = dict(
        embed_dims=(32, 64, 144, 288), depths=(3, 3, 4, 2), attn_depths=(0, 0, 3, 3), mlp_ratios=(1, 4))
    return _create_efficientmod('efficientmod_xs', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def efficientmod_s(pretrained: bool = False, **kwargs) -> EfficientMod:
    model_args = dict(
        embed_dims=(32, 64, 144, 312), depths=(4, 4, 8, 4), attn_depths=(0, 0, 4, 4), mlp_ratios=(1, 6),
        attn_mlp_ratios=(4, 4, 4, 5))
    return _create_efficientmod('efficientmod_s', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def efficientmod_s_conv(pretrained: bool = False, **kwargs) -> EfficientMod:
    model_args = dict(
        embed_dims=(40, 80, 160, 344), depths=(4, 4, 12, 8), attn_depths=(0, 0, 0, 0), mlp_ratios=(1, 6))
    return _create_efficientmod('efficientmod_s_conv', pretrained=pretrained, **dict(model_args, **kwargs))
