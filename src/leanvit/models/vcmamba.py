"""VCMamba: EfficientFormerV2-style convolutional stages finished by multi-directional Mamba blocks.

Paper: `VCMamba: Bridging Convolutions with Multi-Directional Mamba for Efficient Visual
Representation` (Munir, Zhang, Marculescu; ICCV 2025 Workshops)
Official code (the architecture and checkpoint names follow it): https://github.com/Wertyuui345/VCMamba

Three stages of EfficientFormerV2 FFN blocks (1x1 -> depthwise 3x3 -> 1x1, layer-scaled) build
local features at strides 4-16. At stride 32, after a few more FFN blocks and a learned absolute
position embedding, the last blocks mix all 7x7 tokens with PlainMamba's 2-D selective SSM: four
zig-zag scans (rows from the top and bottom, columns from the left and right) share one SSM, each
adding a learned per-move offset to B, and their outputs are summed. Only 49 tokens are scanned,
so the global mixing costs little, and the scan here is plain PyTorch
(:mod:`leanvit.models.layers.selective_scan`) that exports to ONNX and runs on every engine.

The position embedding and the scan orders are built for one resolution (224 -> 7x7): other input
sizes need a model created with that ``img_size``.
"""
from __future__ import annotations

import math
import re
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ConvNormAct, DropPath, LayerNorm2d, calculate_drop_path_rates, get_device_dtype, lecun_normal_, to_2tuple,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_function, register_notrace_module
from timm.models.efficientformer_v2 import ConvMlpWithNorm, Downsample, EfficientFormerV2Block, Stem4

from ..errors import InputSizeError, LeanvitError
from ._pretrained import evaluated_weights, whole_file_filter
from .layers import selective_scan

__all__ = ['VCMamba', 'snake_scan_orders']


def snake_scan_orders(height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """PlainMamba's four zig-zag scans of an ``height x width`` grid.

    Returns ``orders`` (4, H*W): the raster index visited at each step of the row snake from the
    top-left (first row left to right), its reverse (from the bottom), the column snake from the
    top-left (first column top to bottom) and its reverse; and ``directions`` (4, H*W): the move
    that entered each step's token (0 start, 1 right, 2 left, 3 up, 4 down), which selects the
    learned offset added to B at that step.
    """
    grid = torch.arange(height * width).view(height, width)
    rows, cols = grid.clone(), grid.t().clone()
    rows[1::2] = rows[1::2].flip(-1)
    cols[1::2] = cols[1::2].flip(-1)
    by_rows, by_cols = rows.flatten(), cols.flatten()
    orders = torch.stack([by_rows, by_rows.flip(0), by_cols, by_cols.flip(0)])
    d_row, d_col = (orders // width).diff(dim=1), (orders % width).diff(dim=1)
    moves = torch.where(d_col == 1, 1, torch.where(d_col == -1, 2, torch.where(d_row == -1, 3, 4)))
    return orders, F.pad(moves, (1, 0))


@register_notrace_module  # FX: a leaf, as the scan's reduction loops over the sequence length
class PlainMamba2d(nn.Module):
    """PlainMamba's multi-directional selective SSM on a fixed token grid, in VCMamba's conv form.

    1x1 conv + BN (C -> E) -> depthwise conv + SiLU -> selective scan in four snake orders sharing
    dt, A, C and D -> sum -> LayerNorm -> ReLU -> 1x1 conv + BN (E -> C). Two quirks of the
    official model (inherited from PlainMamba) are kept because its weights were trained with
    them: only the scanned input follows each order while dt, B and C stay in raster order, and
    ``dt_proj``'s bias is added twice (by the Linear, then as the scan's ``delta_bias``).
    """

    def __init__(
            self,
            dim: int,
            grid_size: Tuple[int, int],
            d_state: int = 16,
            expand: int = 2,
            dt_rank: Optional[int] = None,
            conv_size: int = 7,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        d_inner = expand * dim
        self.d_state = d_state
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.in_proj = ConvNormAct(dim, d_inner, 1, bias=True, apply_act=False, **dd)
        self.conv_dw = nn.Conv2d(d_inner, d_inner, conv_size, padding=conv_size // 2, groups=d_inner, **dd)
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False, **dd)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, **dd)
        # S4D-real: A = -(1, 2, ..., N) for every channel, stored as log(-A)
        A = torch.arange(1, d_state + 1, device=device, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))  # kept in float32, as Mamba does
        self.D = nn.Parameter(torch.ones(d_inner, **dd))
        self.direction_Bs = nn.Parameter(torch.zeros(5, d_state, **dd))  # start, right, left, up, down
        self.norm = nn.LayerNorm(d_inner, **dd)
        self.out_proj = ConvNormAct(d_inner, dim, 1, bias=True, apply_act=False, **dd)

        self.grid_size = tuple(grid_size)
        num_scans, length = 4, self.grid_size[0] * self.grid_size[1]
        index = {'device': device, 'dtype': torch.long}
        self.register_buffer('scan_order', torch.empty(num_scans * length, **index), persistent=False)
        self.register_buffer('scan_inverse', torch.empty(num_scans * length, **index), persistent=False)
        self.register_buffer('scan_direction', torch.empty(num_scans, length, **index), persistent=False)
        self.init_non_persistent_buffers()
        trunc_normal_(self.direction_Bs, std=.02)

    def init_non_persistent_buffers(self) -> None:
        """Compute the scan orders, which the state dict does not hold: at construction, and after a
        meta-device model is materialised (timm's ``reinit_non_persistent_buffers``)."""
        orders, directions = snake_scan_orders(*self.grid_size)
        num_scans, length = orders.shape
        # Flat gather indices: all four orders in one index_select, and back (scan k's output
        # sits at k * L + step once the scans are laid side by side).
        inverse = orders.argsort(dim=1) + length * torch.arange(num_scans)[:, None]
        self.scan_order.copy_(orders.flatten())
        self.scan_inverse.copy_(inverse.flatten())
        self.scan_direction.copy_(directions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        x = self.act(self.conv_dw(self.in_proj(x))).flatten(2)  # (B, E, L)
        num_scans, length = self.scan_direction.shape
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(dt).transpose(1, 2)  # bias included here, and again as delta_bias below
        u = x.index_select(-1, self.scan_order).unflatten(-1, (num_scans, length)).transpose(1, 2)
        B = B.transpose(1, 2).unsqueeze(1) + self.direction_Bs[self.scan_direction].transpose(1, 2).to(B.dtype)
        y = selective_scan(
            u,  # (B, 4, E, L), one row per scan order
            dt.unsqueeze(1),  # shared by the four scans, so their decays are computed once
            -torch.exp(self.A_log.float()),
            B,  # (B, 4, N, L): B plus each step's direction offset
            C.transpose(1, 2).unsqueeze(1),
            self.D,
            delta_bias=self.dt_proj.bias,
            delta_softplus=True,
        )
        y = y.transpose(1, 2).flatten(2).index_select(-1, self.scan_inverse)
        y = y.unflatten(-1, (num_scans, length)).sum(2)  # back to raster order, summed over scans
        y = F.relu(self.norm(y.transpose(1, 2))).transpose(1, 2)
        # contiguous: torch.export pins the batch size to 1 when a conv gets this transposed view
        return self.out_proj(y.unflatten(-1, (height, width)).contiguous())


class VCMambaBlock(nn.Module):
    """x + Mamba(BN(x)), then x + conv MLP(BN(x)); no layer scale (the official default)."""

    def __init__(
            self,
            dim: int,
            grid_size: Tuple[int, int],
            mlp_ratio: float = 4.,
            d_state: int = 16,
            expand: int = 2,
            dt_rank: Optional[int] = None,
            conv_size: int = 7,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim, **dd)
        self.mamba = PlainMamba2d(dim, grid_size, d_state, expand, dt_rank, conv_size, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim, **dd)
        self.mlp = ConvMlpWithNorm(dim, int(dim * mlp_ratio), drop=proj_drop, mid_conv=True, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.mamba(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VCMambaStage(nn.Module):
    """Downsample, EfficientFormerV2 FFN blocks, then (if any) position embedding + Mamba blocks."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            num_mamba: int,
            grid_size: Tuple[int, int],
            downsample: bool,
            drop_path: Sequence[float],
            mlp_ratio: float = 4.,
            layer_scale_init_value: float = 1e-5,
            pos_drop: float = 0.,
            proj_drop: float = 0.,
            mamba_cfg: Optional[dict] = None,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = Downsample(in_dim, dim, **dd) if downsample else nn.Identity()
        num_conv = depth - num_mamba
        self.blocks = nn.Sequential(*[
            EfficientFormerV2Block(
                dim, mlp_ratio, proj_drop=proj_drop, drop_path=drop_path[j],
                layer_scale_init_value=layer_scale_init_value, use_attn=False, **dd,
            )
            for j in range(num_conv)
        ])
        if num_mamba:
            self.pos_embed = nn.Parameter(torch.zeros(1, dim, *grid_size, **dd))
            self.pos_drop = nn.Dropout(pos_drop)
            self.mamba_blocks = nn.Sequential(*[
                VCMambaBlock(
                    dim, grid_size, mlp_ratio, proj_drop=proj_drop, drop_path=drop_path[num_conv + j],
                    **(mamba_cfg or {}), **dd,
                )
                for j in range(num_mamba)
            ])
            trunc_normal_(self.pos_embed, std=.02)
        else:
            self.pos_embed = self.pos_drop = self.mamba_blocks = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        # (the is_scripting check inline in each condition, where TorchScript sees it)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        if self.mamba_blocks is not None:
            x = self.pos_drop(x + self.pos_embed)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(self.mamba_blocks, x)
            else:
                x = self.mamba_blocks(x)
        return x


# FX tracing keeps this one call (it cannot trace the comparison) and, since the input passes
# through it, feature extractors do not prune it: the traced model still checks its input.
# A public name, as FX only wraps functions without a leading underscore.
@register_notrace_function
def check_img_size(x: torch.Tensor, img_size: Tuple[int, int]) -> torch.Tensor:
    h, w = img_size
    if x.shape[-2] != h or x.shape[-1] != w:
        raise InputSizeError(
            f"VCMamba takes {h}x{w} inputs only (its position embedding and scan orders are built "
            f"for that size), got {x.shape[-2]}x{x.shape[-1]}. Resize the input to {h}x{w}, or "
            f"create the model with img_size={x.shape[-2]} (or ({x.shape[-2]}, {x.shape[-1]}))."
        )
    return x


class VCMamba(nn.Module):
    """VCMamba classifier: stem, four stages (Mamba blocks at the end of the last), LN, two heads.

    Like EfficientFormer, it has a distillation head: in eval the output is the average of the two
    heads' logits; in training with ``set_distilled_training(True)`` both are returned. With
    ``global_pool=''`` the classifiers score every position of the normed final map: the output is
    a (B, num_classes, H, W) logit map (as timm's ConvNeXt and TinyViT heads give unpooled).
    """

    def __init__(
            self,
            embed_dims: Tuple[int, ...] = (32, 64, 144, 288),
            depths: Tuple[int, ...] = (4, 4, 12, 8),
            num_mamba: int = 4,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            mlp_ratio: float = 4.,
            layer_scale_init_value: float = 1e-5,
            d_state: int = 16,
            expand: int = 2,
            dt_rank: Optional[int] = None,
            conv_size: int = 7,
            distillation: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            embed_dims: Width of each stage.
            depths: Blocks per stage, Mamba blocks included.
            num_mamba: How many of the last stage's blocks are Mamba blocks.
            img_size: The one input resolution the model takes (position embedding, scan orders).
            d_state, expand, dt_rank, conv_size: The SSM's state size, channel expansion, rank of
                the dt projection (None: ceil(width / 16)) and depthwise conv kernel.
            distillation: Add the distillation head (``head_dist``).
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        _check_global_pool(global_pool)
        if not 0 < num_mamba <= depths[-1]:
            raise LeanvitError(f"num_mamba must be between 1 and the last stage's depth {depths[-1]}, got {num_mamba}.")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.img_size = to_2tuple(img_size)
        grid = self.img_size
        for _ in range(len(depths) + 1):  # stem (2 convs) + 3 downsamples, each 3x3 stride 2 pad 1
            grid = tuple((g - 1) // 2 + 1 for g in grid)

        self.stem = Stem4(in_chans, embed_dims[0], act_layer=nn.ReLU, **dd)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        mamba_cfg = dict(d_state=d_state, expand=expand, dt_rank=dt_rank, conv_size=conv_size)
        stages = []
        self.feature_info = []
        prev_dim = embed_dims[0]
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            last = i == len(depths) - 1
            stages.append(VCMambaStage(
                prev_dim, dim, depth,
                num_mamba=num_mamba if last else 0,
                grid_size=grid,
                downsample=i > 0,
                drop_path=dpr[i],
                mlp_ratio=mlp_ratio,
                layer_scale_init_value=layer_scale_init_value,
                pos_drop=drop_rate,
                proj_drop=proj_drop_rate,
                mamba_cfg=mamba_cfg,
                **dd,
            ))
            prev_dim = dim
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2), module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.norm = LayerNorm2d(embed_dims[-1], eps=1e-5, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        if distillation:
            self.head_dist = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        else:
            self.head_dist = None
        self.distilled_training = False

        self.apply(self._init_weights)
        self._init_convs()

    @staticmethod
    def _init_weights(m: nn.Module):
        # As the official model does it: every Linear (dt_proj included) truncated-normal, zero bias.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _init_convs(self) -> None:
        """The official convs' own inits, for training from scratch: each MLP's 1x1 convs truncated-normal (std
        .02, zero bias: its ``Mlp`` applies that before it creates the depthwise ``mid`` conv, which keeps PyTorch's
        default), the stem's convs LeCun-normal with a zero bias (``segm_init_weights``); the others PyTorch's."""
        for mlp in (m for m in self.modules() if isinstance(m, ConvMlpWithNorm)):
            for conv in (mlp.fc1.conv, mlp.fc2.conv):
                trunc_normal_(conv.weight, std=.02)
                nn.init.zeros_(conv.bias)
        for conv in (self.stem.conv1.conv, self.stem.conv2.conv):
            lecun_normal_(conv.weight)
            nn.init.zeros_(conv.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The position embedding and the SSM's A, D and direction offsets (PlainMamba's recipe)."""
        return {k for k, _ in self.named_parameters() if re.search(r'(pos_embed|A_log|\.D|direction_Bs)$', k)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        if coarse:
            return dict(stem=r'^stem', blocks=r'^stages\.(\d+)')
        fine = [
            (r'^stages\.(\d+)\.downsample', (0,)),  # with the stage's first block, as in timm
            (r'^stages\.(\d+)\.blocks\.(\d+)\.', None),
        ]
        # A stage's Mamba blocks run after its FFN blocks, so they take the ordinals that follow
        # theirs (a regex cannot add the offset, hence one entry per block); the position
        # embedding is added just before the first Mamba block and joins its group.
        for i, stage in enumerate(self.stages):
            if stage.mamba_blocks is not None:
                first = len(stage.blocks)
                fine.append((rf'^stages\.{i}\.pos_embed$', (i, first)))
                fine += [
                    (rf'^stages\.{i}\.mamba_blocks\.{j}\.', (i, first + j))
                    for j in range(len(stage.mamba_blocks))
                ]
        fine.append((r'^norm', (99999,)))
        return dict(stem=r'^stem', blocks=fine)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> Tuple[nn.Module, Optional[nn.Module]]:
        return self.head, self.head_dist

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        dd = get_device_dtype(self)
        if global_pool is not None:
            _check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)
        if self.head_dist is not None:
            self.head_dist = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
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
            norm: Apply the final norm to the last stage's output when it is taken.
            stop_early: Stop after the last stage that ``indices`` asks for.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the intermediates.
        """
        assert output_fmt == 'NCHW', 'Output format must be NCHW.'
        x = check_img_size(x, self.img_size)
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        x = self.stem(x)
        if torch.jit.is_scripting() or not stop_early:  # can't slice stages in torchscript
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == last_idx else x)
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
        """Drop the stages after the last one ``indices`` asks for (and the norm and head)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for (and only applied to) the last stage
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = check_img_size(x, self.img_size)
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        if self.global_pool == 'avg':
            x = x.mean((2, 3))
        x = self.head_drop(x)
        if pre_logits:
            return x
        unpooled = self.global_pool == ''
        if unpooled:
            # the classifiers score every position, giving (B, num_classes, H, W) logit maps
            x = x.permute(0, 2, 3, 1)
        if self.head_dist is None:
            x = self.head(x)
            return x.permute(0, 3, 1, 2) if unpooled else x
        x, x_dist = self.head(x), self.head_dist(x)
        if unpooled:
            x, x_dist = x.permute(0, 3, 1, 2), x_dist.permute(0, 3, 1, 2)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return x, x_dist
        return (x + x_dist) / 2

    def forward(self, x: torch.Tensor):
        return self.forward_head(self.forward_features(x))


def _check_global_pool(global_pool: str) -> None:
    if global_pool not in ('', 'avg'):
        raise LeanvitError(f"VCMamba supports global_pool='avg' or '' (no pooling), got {global_pool!r}.")


def checkpoint_filter_fn(state_dict: dict, model: VCMamba) -> dict:
    """Map an official Wertyuui345/VCMamba checkpoint onto this implementation.

    The official trainer (DeiT's) saves ``{'model', 'model_ema', ...}``; other wrappers are
    unwrapped too. The live weights come first, unlike timm's EMA-first default: the official
    evaluation (``main.py --resume ... --eval``) loads ``model``, so that is what the published
    top-1 measures. The official ``network`` is one flat list:
    stage ``s`` at index ``2s``, its downsample at ``2s - 1``; the last stage lists its FFN blocks,
    then its Mamba blocks, and its position embedding sits at the top as ``pos_embed``. Layer
    scales are stored as (C, 1, 1).
    """
    state_dict = evaluated_weights(state_dict)  # the live weights before the EMA
    if 'stem.conv1.conv.weight' in state_dict:
        return _drop_absent_dist_head(state_dict, model)  # already in this implementation's names

    last = len(model.stages) - 1
    num_conv = [len(s.blocks) for s in model.stages]

    def block(m: re.Match) -> str:
        s, j = int(m[1]) // 2, int(m[2])
        if j < num_conv[s]:
            return f'stages.{s}.blocks.{j}.'
        return f'stages.{s}.mamba_blocks.{j - num_conv[s]}.'

    renames = [
        (r'^module\.', ''),
        (r'^patch_embed\.0\.', 'stem.conv1.conv.'), (r'^patch_embed\.1\.', 'stem.conv1.bn.'),
        (r'^patch_embed\.3\.', 'stem.conv2.conv.'), (r'^patch_embed\.4\.', 'stem.conv2.bn.'),
        (r'^network\.(\d*[13579])\.proj\.', lambda m: f'stages.{(int(m[1]) + 1) // 2}.downsample.conv.conv.'),
        (r'^network\.(\d*[13579])\.norm\.', lambda m: f'stages.{(int(m[1]) + 1) // 2}.downsample.conv.bn.'),
        (r'^network\.(\d*[02468])\.(\d+)\.', block),
        (r'\.mlp\.fc1\.', '.mlp.fc1.conv.'), (r'\.mlp\.norm1\.', '.mlp.fc1.bn.'),
        (r'\.mlp\.mid\.', '.mlp.mid.conv.'), (r'\.mlp\.mid_norm\.', '.mlp.mid.bn.'),
        (r'\.mlp\.fc2\.', '.mlp.fc2.conv.'), (r'\.mlp\.norm2\.', '.mlp.fc2.bn.'),
        (r'\.layer_scale_2$', '.ls2.gamma'),
        (r'(mamba_blocks\.\d+)\.norm\.', r'\1.norm1.'),
        (r'\.mamba\.in_conv\.0\.', '.mamba.in_proj.conv.'), (r'\.mamba\.in_conv\.1\.', '.mamba.in_proj.bn.'),
        (r'\.mamba\.conv2d\.', '.mamba.conv_dw.'),
        (r'\.mamba\.out_conv\.1\.', '.mamba.out_proj.conv.'), (r'\.mamba\.out_conv\.2\.', '.mamba.out_proj.bn.'),
        (r'^pos_embed$', f'stages.{last}.pos_embed'),
        (r'^dist_head\.', 'head_dist.'),
    ]
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in renames:
            k = re.sub(pattern, repl, k)
        if k.endswith('.ls2.gamma'):
            v = v.flatten()
        out[k] = v
    return _drop_absent_dist_head(out, model)


def _drop_absent_dist_head(state_dict: dict, model: VCMamba) -> dict:
    """Without the distillation head (``distillation=False``), the official checkpoints' ``head_dist`` weights
    have nowhere to go: dropped, so the rest of the model loads (the class head alone is then the output)."""
    if getattr(model, 'head_dist', None) is not None:
        return state_dict
    return {k: v for k, v in state_dict.items() if not k.startswith('head_dist.')}


def _create_vcmamba(variant: str, pretrained: bool = False, **kwargs) -> VCMamba:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_cfg(
        VCMamba, variant, pretrained,
        # a file goes to the filter whole, as the hub's does: timm's file loader would hand it the EMA, not 'model'
        pretrained_filter_fn=whole_file_filter(checkpoint_filter_fn, pretrained, kwargs),
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


#: Registered variants; their published numbers are in ``leanvit.catalog``.
VARIANTS = ('vcmamba_s', 'vcmamba_m', 'vcmamba_b')


def _cfg(**kwargs) -> dict:
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7), 'fixed_input_size': True,
        # the published top-1 is main.py --eval's: --eval-crop-ratio 0.875 (the model file's own
        # default_cfg says 0.9, which main.py never reads)
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv1.conv', 'classifier': ('head', 'head_dist'),
        'origin_url': 'https://github.com/Wertyuui345/VCMamba',
        **kwargs,
    }


# The official checkpoints (README): Hugging Face SLDGroup/VCMamba, one DeiT-style file per variant.
default_cfgs = generate_default_cfgs({
    f'{name}.in1k': _cfg(hf_hub_id='SLDGroup/VCMamba', hf_hub_filename=f'VCMamba-{name[-1].upper()}.pth')
    for name in VARIANTS
})


@register_model
def vcmamba_s(pretrained: bool = False, **kwargs) -> VCMamba:
    """VCMamba-S: EfficientFormerV2-S2 widths and depths, the last 4 blocks Mamba."""
    model_args = dict(embed_dims=(32, 64, 144, 288), depths=(4, 4, 12, 8), drop_path_rate=0.2)
    return _create_vcmamba('vcmamba_s', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vcmamba_m(pretrained: bool = False, **kwargs) -> VCMamba:
    """VCMamba-M: EfficientFormer-L1 widths, L3 depths, the last 4 blocks Mamba."""
    model_args = dict(embed_dims=(48, 96, 224, 448), depths=(4, 4, 12, 6), drop_path_rate=0.2)
    return _create_vcmamba('vcmamba_m', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vcmamba_b(pretrained: bool = False, **kwargs) -> VCMamba:
    """VCMamba-B: EfficientFormer-L3 widths and depths, the last 4 blocks Mamba."""
    model_args = dict(embed_dims=(64, 128, 320, 512), depths=(4, 4, 12, 6), drop_path_rate=0.2)
    return _create_vcmamba('vcmamba_b', pretrained=pretrained, **dict(model_args, **kwargs))
