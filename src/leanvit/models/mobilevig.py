"""MobileViG: a vision graph network built for mobile inference engines.

Paper: `MobileViG: Graph-Based Sparse Attention for Mobile Vision Applications`
(Munir, Avery, Marculescu; CVPR Workshops 2023) - https://arxiv.org/abs/2307.00395
Official code (the architecture and checkpoint names follow it): https://github.com/SLDGroup/MobileViG

Three local stages of inverted-residual blocks at strides 4-16 feed one global stage of SVGA
blocks at stride 32. SVGA (sparse vision graph attention) links every token to the tokens K, 2K, ...
rows and columns away, wrapping around the map. The graph is fixed, so unlike ViG there is no k-NN
search: aggregating it is a few rolls and maxima, which every inference engine runs well.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Callable, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ConvNormAct, DropPath, LayerScale2d, calculate_drop_path_rates, get_device_dtype
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_module

from ..errors import LeanvitError
from ._pretrained import evaluated_weights, whole_file_filter

__all__ = ['MobileViG']


class InvertedResidual(nn.Module):
    """The local block: 1x1 expand -> depthwise 3x3 -> 1x1 project, with layer scale."""

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.,
            act_layer: Type[nn.Module] = nn.GELU,
            layer_scale_init_value: float = 1e-5,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = ConvNormAct(dim, hidden, 1, bias=True, act_layer=act_layer, **dd)
        self.mid = ConvNormAct(hidden, hidden, 3, groups=hidden, bias=True, act_layer=act_layer, **dd)
        self.fc2 = ConvNormAct(hidden, dim, 1, bias=True, apply_act=False, **dd)
        self.ls = LayerScale2d(dim, layer_scale_init_value, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.ls(self.fc2(self.mid(self.fc1(x)))))


@register_notrace_module  # FX: a leaf, as the number of neighbours follows the map size
class SparseGraphConv(nn.Module):
    """Max-relative graph convolution over SVGA's fixed graph.

    Each token's neighbours are the tokens ``hop``, ``2*hop``, ... rows away (same column) and
    columns away (same row), wrapping around. Max-relative aggregation keeps, per channel, the
    largest ``x - x_neighbour``; as in the official code the running maximum starts at zero, so the
    result is never negative (and is zero on maps too small to have neighbours).
    """

    def __init__(
            self,
            dim: int,
            hop: int = 2,
            act_layer: Type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        self.hop = hop
        self.proj = ConvNormAct(2 * dim, 2 * dim, 1, bias=True, act_layer=act_layer, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        rel = torch.zeros_like(x)
        for shift in range(self.hop, H, self.hop):
            rel = torch.maximum(rel, x - torch.roll(x, shift, dims=2))
        for shift in range(self.hop, W, self.hop):
            rel = torch.maximum(rel, x - torch.roll(x, shift, dims=3))
        return self.proj(torch.cat([x, rel], dim=1))


class Grapher(nn.Module):
    """1x1 conv -> sparse graph conv (C -> 2C) -> 1x1 conv back to C, residual."""

    def __init__(
            self,
            dim: int,
            hop: int = 2,
            act_layer: Type[nn.Module] = nn.GELU,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.fc1 = ConvNormAct(dim, dim, 1, bias=True, apply_act=False, **dd)
        self.graph_conv = SparseGraphConv(dim, hop, act_layer=act_layer, **dd)
        self.fc2 = ConvNormAct(2 * dim, dim, 1, bias=True, apply_act=False, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.fc2(self.graph_conv(self.fc1(x))))


class ConvFfn(nn.Module):
    """1x1 conv MLP with batch norms, residual."""

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.,
            act_layer: Type[nn.Module] = nn.GELU,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = ConvNormAct(dim, hidden, 1, bias=True, act_layer=act_layer, **dd)
        self.fc2 = ConvNormAct(hidden, dim, 1, bias=True, apply_act=False, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.fc2(self.fc1(x)))


class SvgaBlock(nn.Module):
    """The global block: Grapher then FFN (no layer scale, both share one drop-path rate)."""

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.,
            hop: int = 2,
            act_layer: Type[nn.Module] = nn.GELU,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grapher = Grapher(dim, hop, act_layer=act_layer, drop_path=drop_path, **dd)
        self.ffn = ConvFfn(dim, mlp_ratio, act_layer=act_layer, drop_path=drop_path, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.grapher(x))


class MobileViGStage(nn.Module):
    """Optional stride-2 conv + BN downsample, then ``depth`` blocks at ``dim_out``."""

    def __init__(
            self,
            dim: int,
            dim_out: int,
            depth: int,
            block_fn: Callable[..., nn.Module],
            downsample: bool = True,
            drop_path: Tuple[float, ...] = (),
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            self.downsample = ConvNormAct(dim, dim_out, 3, stride=2, bias=True, apply_act=False, **dd)
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[block_fn(dim_out, drop_path=drop_path[i], **dd) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class MobileViG(nn.Module):
    """MobileViG: local inverted-residual stages, then one global SVGA stage at stride 32.

    The head pools first and then widens with a 1x1 conv (+ BN + GELU) to ``head_hidden_size``
    (timm's "efficient head", as in MobileNetV3), feeding a classifier and a distillation
    classifier whose outputs are averaged unless distilled training is switched on. With
    ``global_pool=''`` the head conv and the classifiers run at every position of the final map
    (as MobileNetV3's head conv does), so the output is a (B, num_classes, H, W) logit map, or the
    (B, head_hidden_size, H, W) map without a classifier.
    """

    def __init__(
            self,
            embed_dims: Tuple[int, ...] = (42, 84, 168, 256),
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            head_hidden_size: int = 512,
            hop: int = 2,
            mlp_ratio: float = 4.,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            act_layer: Type[nn.Module] = nn.GELU,
            layer_scale_init_value: float = 1e-5,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            embed_dims: Width of each stage; the last stage is the global (SVGA) one.
            depths: Blocks per stage.
            head_hidden_size: Width of the 1x1 conv after pooling (the pre-logits features).
            hop: SVGA's K: neighbours are K, 2K, ... tokens away along H and W.
            mlp_ratio: Expansion of the inverted residuals and of the global FFNs.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        _check_global_pool(global_pool)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool

        self.stem = nn.Sequential()
        self.stem.add_module('conv1', ConvNormAct(in_chans, embed_dims[0] // 2, 3, stride=2, bias=True, act_layer=act_layer, **dd))
        self.stem.add_module('conv2', ConvNormAct(embed_dims[0] // 2, embed_dims[0], 3, stride=2, bias=True, act_layer=act_layer, **dd))

        local_block = partial(InvertedResidual, mlp_ratio=mlp_ratio, act_layer=act_layer, layer_scale_init_value=layer_scale_init_value)
        global_block = partial(SvgaBlock, mlp_ratio=mlp_ratio, hop=hop, act_layer=act_layer)
        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))
        self.num_stages = len(depths)
        stages = []
        self.feature_info = []
        prev_dim = embed_dims[0]
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            stages.append(MobileViGStage(
                prev_dim,
                dim,
                depth,
                block_fn=global_block if i == self.num_stages - 1 else local_block,
                downsample=i > 0,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                **dd,
            ))
            prev_dim = dim
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2), module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        self.num_features = embed_dims[-1]
        self.head_hidden_size = head_hidden_size
        self.conv_head = ConvNormAct(self.num_features, head_hidden_size, 1, bias=True, act_layer=act_layer, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head_dist = nn.Linear(head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.distilled_training = False

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        # The official model draws every conv (head included) from kaiming-normal, zero bias.
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
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
                (r'^conv_head', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> Tuple[nn.Module, nn.Module]:
        return self.head, self.head_dist

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        dd = get_device_dtype(self)
        if global_pool is not None:
            _check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head_dist = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)
        self.head_dist.train(self.training)

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True):
        """In training mode, return (head, dist head) logits separately for a distillation loss."""
        self.distilled_training = enable

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
            norm: Unused: MobileViG has no norm after its last stage.
            stop_early: Stop after the last stage that ``indices`` asks for.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the intermediates.
        """
        assert output_fmt == 'NCHW', 'Output format must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.stem(x)
        if torch.jit.is_scripting() or not stop_early:  # can't slice stages in torchscript
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
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
        """Drop the stages after the last one ``indices`` asks for (and the head)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.feature_info[max_index]['num_chs']
        if prune_end or prune_head:
            # the 1x1 head conv is sized for (and part of the head after) the final stage
            self.conv_head = nn.Identity()
            self.head_hidden_size = self.num_features
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        if self.global_pool == 'avg':
            x = x.mean((2, 3), keepdim=True)
        x = self.head_drop(self.conv_head(x))
        if self.global_pool:
            x = x.flatten(1)
        if pre_logits:
            return x
        if not self.global_pool:
            # unpooled: both classifiers score every position, giving (B, num_classes, H, W) logit maps
            x = x.permute(0, 2, 3, 1)
        x, x_dist = self.head(x), self.head_dist(x)
        if not self.global_pool:
            x, x_dist = x.permute(0, 3, 1, 2), x_dist.permute(0, 3, 1, 2)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return x, x_dist
        return (x + x_dist) / 2

    def forward(self, x: torch.Tensor):
        return self.forward_head(self.forward_features(x))


def _check_global_pool(global_pool: str) -> None:
    if global_pool not in ('', 'avg'):
        raise LeanvitError(
            f"MobileViG supports global_pool='avg' or '' (no pooling), got {global_pool!r}: its head conv "
            "is sized for average-pooled features."
        )


def checkpoint_filter_fn(state_dict: dict, model: MobileViG) -> dict:
    """Map an official SLDGroup/MobileViG checkpoint onto this implementation.

    The official trainer saves ``{'state_dict', 'state_dict_ema', ...}``. The live weights come
    first, unlike timm's EMA-first default: the official evaluation (``main.py --resume ... --eval``)
    loads ``state_dict``, so that is what the published top-1 measures. ``local_backbone`` is one
    flat list of blocks and downsamples, the last of which leads into the global stage, and
    ``backbone.i`` is (Grapher, FFN) pairs. Layer scales are stored as (C, 1, 1) and the
    classifiers as 1x1 convs.
    """
    state_dict = evaluated_weights(state_dict)  # the live weights before the EMA
    if 'stem.conv1.conv.weight' in state_dict:
        return state_dict  # already in this implementation's names

    # official flat local_backbone index -> our "stages.s.<blocks.j | downsample>"
    depths = [len(s.blocks) for s in model.stages]
    local = []
    for s, depth in enumerate(depths[:-1]):
        if s > 0:
            local.append(f'stages.{s}.downsample')
        local += [f'stages.{s}.blocks.{j}' for j in range(depth)]
    local.append(f'stages.{len(depths) - 1}.downsample')
    glob = f'stages.{len(depths) - 1}.blocks'

    renames = [
        (r'^stem\.stem\.0\.', 'stem.conv1.conv.'), (r'^stem\.stem\.1\.', 'stem.conv1.bn.'),
        (r'^stem\.stem\.3\.', 'stem.conv2.conv.'), (r'^stem\.stem\.4\.', 'stem.conv2.bn.'),
        (r'^local_backbone\.(\d+)\.', lambda m: local[int(m[1])] + '.'),
        (r'\.conv\.0\.', '.conv.'), (r'\.conv\.1\.', '.bn.'),  # Downsample's Sequential(conv, bn)
        (r'\.mlp\.fc1\.', '.fc1.conv.'), (r'\.mlp\.norm1\.', '.fc1.bn.'),
        (r'\.mlp\.mid\.', '.mid.conv.'), (r'\.mlp\.mid_norm\.', '.mid.bn.'),
        (r'\.mlp\.fc2\.', '.fc2.conv.'), (r'\.mlp\.norm2\.', '.fc2.bn.'),
        (r'\.layer_scale_2$', '.ls.gamma'),
        (r'^backbone\.(\d+)\.0\.', glob + r'.\1.grapher.'), (r'^backbone\.(\d+)\.1\.', glob + r'.\1.ffn.'),
        (r'\.graph_conv\.nn\.0\.', '.graph_conv.proj.conv.'), (r'\.graph_conv\.nn\.1\.', '.graph_conv.proj.bn.'),
        (r'\.(fc[12])\.0\.', r'.\1.conv.'), (r'\.(fc[12])\.1\.', r'.\1.bn.'),
        (r'^prediction\.1\.', 'conv_head.conv.'), (r'^prediction\.2\.', 'conv_head.bn.'),
        (r'^dist_head\.', 'head_dist.'),
    ]
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in renames:
            k = re.sub(pattern, repl, k)
        if k.endswith('.ls.gamma'):
            v = v.flatten()
        elif k in ('head.weight', 'head_dist.weight'):
            v = v.flatten(1)
        out[k] = v
    return out


def _create_mobilevig(variant: str, pretrained: bool = False, **kwargs) -> MobileViG:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_cfg(
        MobileViG, variant, pretrained,
        # a file goes to the filter whole: timm's file loader would hand it the EMA, not 'state_dict'
        pretrained_filter_fn=whole_file_filter(checkpoint_filter_fn, pretrained, kwargs),
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


#: Registered variants; their published numbers are in ``leanvit.catalog``.
VARIANTS = ('mobilevig_ti', 'mobilevig_s', 'mobilevig_m', 'mobilevig_b')


def _cfg(**kwargs) -> dict:
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.9, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv1.conv', 'classifier': ('head', 'head_dist'),
        'paper_ids': 'arXiv:2307.00395', 'origin_url': 'https://github.com/SLDGroup/MobileViG',
        'license': 'apache-2.0',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in VARIANTS})


@register_model
def mobilevig_ti(pretrained: bool = False, **kwargs) -> MobileViG:
    model_args = dict(embed_dims=(42, 84, 168, 256), depths=(2, 2, 6, 2), head_hidden_size=512)
    return _create_mobilevig('mobilevig_ti', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mobilevig_s(pretrained: bool = False, **kwargs) -> MobileViG:
    model_args = dict(embed_dims=(42, 84, 176, 256), depths=(3, 3, 9, 3), head_hidden_size=512)
    return _create_mobilevig('mobilevig_s', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mobilevig_m(pretrained: bool = False, **kwargs) -> MobileViG:
    model_args = dict(embed_dims=(42, 84, 224, 400), depths=(3, 3, 9, 3), head_hidden_size=768)
    return _create_mobilevig('mobilevig_m', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mobilevig_b(pretrained: bool = False, **kwargs) -> MobileViG:
    model_args = dict(embed_dims=(42, 84, 240, 464), depths=(5, 5, 15, 5), head_hidden_size=768)
    return _create_mobilevig('mobilevig_b', pretrained=pretrained, **dict(model_args, **kwargs))
