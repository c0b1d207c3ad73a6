"""The three parts of Feature Mapping: feature extractor f, mapping g and pose head h.

Synthetic image: h(f_S(x)). Real image: h(g(f_R(x))); g is never applied to synthetic features.
Images are NCHW float32 in [-1, 1]: objects 3x128x128 RGB crops, hands 1x128x128 normalised depth.
Outputs are crop-normalised corner projections (B, 16 per object) for the BB8 object head, dense
maps (B, 4 per object, S/2, S/2) of visibility logits and normalised model coordinates for the
dense object head, and joints divided by the cube half-size (B, 42) for hands.

Normalisation layers are GroupNorm (or none), never BatchNorm: the frozen f_S must give the same
feature in train and eval mode, and data-parallel training must match single-process training
without synchronising batch statistics.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from featmap_ros.heads.dense import DENSE_CHANNELS, DENSE_STRIDE  # noqa: F401 (part of the nets' API)
from featmap_ros.heads.dense_train import binned_to_coordinates
from featmap_ros.heads.keypoints import KEYPOINT_FPS, keypoint_channels

TASKS = ("objects", "hands")
# Object heads: "bb8" regresses the 8 box corners from a global feature (the paper's configuration);
# "dense" predicts, at every location of a spatial feature map, a visibility logit and the object's
# normalised model coordinates (pose by PnP-RANSAC over the correspondences, featmap_ros/heads/dense.py);
# "keypoints" predicts there a visibility logit and unit vectors to the object's keypoints (PVNet: RANSAC
# voting, then PnP; featmap_ros/heads/keypoints.py).
# Hand heads: "fc" regresses the joints from a global feature (the paper's DeepPrior++ configuration);
# "vote" lets every location of a spatial feature map vote for every joint (VoteHead).
OBJECT_HEADS = ("bb8", "dense", "keypoints")
HAND_HEADS = ("fc", "vote")
HEADS = OBJECT_HEADS + HAND_HEADS
SPATIAL_HEADS = ("dense", "keypoints", "vote")
SPATIAL_OBJECT_HEADS = ("dense", "keypoints")  # per-location maps at DENSE_STRIDE, their channels per object
# Output channels per object of the object heads (keypoints: the box centre and KEYPOINT_FPS surface points).
_OBJECT_HEAD_CHANNELS = {"bb8": 16, "dense": DENSE_CHANNELS, "keypoints": keypoint_channels(1 + KEYPOINT_FPS)}


def object_head_channels(head: str) -> int:
    """Outputs per object of an object head (OBJECT_HEADS) as the experiments train it."""
    if head not in _OBJECT_HEAD_CHANNELS:
        raise ValueError(f"object head must be one of {OBJECT_HEADS}, got {head!r}")
    return _OBJECT_HEAD_CHANNELS[head]

# What "paper-like" means per task when a field is left as None: VGG-16 convolutions for objects
# (BB8), a DeepPrior++-like ResNet (5x5 stem of 32, stages 64/128/256/256) for hands.
_TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "objects": {"in_channels": 3, "n_outputs": 16, "width": 64, "blocks": (2, 2, 3, 3, 3)},
    "hands": {"in_channels": 1, "n_outputs": 42, "width": 32, "blocks": (2, 2, 2, 2)},
}


@dataclass(frozen=True)
class NetConfig:
    """Architecture of f, g and h; fields left None take the task's paper-like default."""

    task: str = "objects"
    in_channels: int | None = None
    input_size: int = 128
    # Objects: channels per VGG stage are (w, 2w, 4w, 8w, 8w). Hands: stem w, stages (2w, 4w, 8w, 8w).
    width: int | None = None
    # Objects: convolutions per VGG stage. Hands: residual blocks per stage (always 4 stages).
    blocks: tuple[int, ...] | None = None
    feature_dim: int = 1024
    n_outputs: int | None = None
    dropout: float = 0.3
    norm: str = "group"
    # Feature Mapping: a separate real-domain extractor f_R and the mapping g exist only when True.
    mapping: bool = False
    mapping_blocks: int = 2
    # With a mapping: one extractor f for both domains (real: h(g(f(x)))) instead of f_S and f_R.
    shared_extractor: bool = False
    # Which pose head: OBJECT_HEADS or HAND_HEADS. "dense" keeps f spatial: n_outputs is then the number
    # of output channels, DENSE_CHANNELS per object. "vote" keeps f spatial too; n_outputs stays 3 per joint.
    # For hands "bb8" (the field's old default, in checkpoints of earlier versions) means "fc".
    head: str = "bb8"
    # Spatial heads: the feature map's stride (2: S/2 x S/2 locations, 4: S/4). The dense object head
    # needs DENSE_STRIDE; the hand vote head defaults to 4 (a quarter of the locations, enough to vote).
    stride: int | None = None
    # The dense head: 0 regresses each model coordinate; N >= 2 predicts it as a distribution over N bins
    # spanning [-1, 1] (trained with a cross-entropy on the two nearest bins), read out as its expectation.
    coord_bins: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == "hands" and self.head == "bb8":
            object.__setattr__(self, "head", "fc")
        allowed = OBJECT_HEADS if self.task == "objects" else HAND_HEADS
        if self.head not in allowed:
            raise ValueError(f"{self.task} head must be one of {allowed}, got {self.head!r}")
        if self.head in SPATIAL_OBJECT_HEADS and self.n_outputs is None:
            # One object; a caller sets object_head_channels(head) per object.
            object.__setattr__(self, "n_outputs", object_head_channels(self.head))
        if self.stride is None:
            object.__setattr__(self, "stride", 4 if self.head == "vote" else DENSE_STRIDE)
        if self.stride not in (2, 4) or (self.head in SPATIAL_OBJECT_HEADS and self.stride != DENSE_STRIDE):
            raise ValueError(f"stride must be 2 or 4 (the spatial object heads: {DENSE_STRIDE}), got {self.stride}")
        for name, value in _TASK_DEFAULTS[self.task].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))  # lists come from JSON/YAML
        n_stages = 5 if self.task == "objects" else 4
        if len(self.blocks) != n_stages or min(self.blocks) < 1:
            raise ValueError(f"{self.task} needs {n_stages} stages of >= 1 block each, got blocks={self.blocks}")
        if self.input_size % 32 != 0 or self.input_size < 32:
            raise ValueError(f"input_size must be a multiple of 32 (5 halvings), got {self.input_size}")
        if self.norm not in ("group", "none"):
            raise ValueError(f"norm must be 'group' or 'none', got {self.norm!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if min(self.width, self.feature_dim, self.n_outputs, self.in_channels) < 1:
            raise ValueError(f"width, feature_dim, n_outputs, in_channels must be positive: {self}")
        if self.head == "vote" and self.n_outputs % 3:
            raise ValueError(f"a vote head has 3 outputs per joint, got n_outputs={self.n_outputs}")
        if self.spatial and self.feature_dim > 256:
            # The dense feature is a full-resolution map: 1024 channels (the FC default) at S/2 would need
            # gigabytes of activations; the experiments use 32 (CPU) to 64 (paper size).
            raise ValueError(f"a spatial head's feature_dim is the channel count of its S/{self.stride} map; "
                             f"expected <= 256, got {self.feature_dim}")
        if self.coord_bins and (self.head != "dense" or not 2 <= self.coord_bins <= 256):
            raise ValueError(f"coord_bins is 0 or 2-256, for the dense head only; got {self.coord_bins} "
                             f"with head {self.head!r}")
        if self.head == "dense" and self.n_outputs % DENSE_CHANNELS:
            raise ValueError(f"a dense head has {DENSE_CHANNELS} channels per object, got n_outputs={self.n_outputs}")

    @property
    def spatial(self) -> bool:
        """True when f gives a feature map (B, feature_dim, S/stride, S/stride), not a vector."""
        return self.head in SPATIAL_HEADS

    def to_dict(self) -> dict[str, Any]:
        """Return the resolved fields as plain JSON/YAML values."""
        d = asdict(self)
        d["blocks"] = list(self.blocks)
        return d


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that normalises bf16 channels_last maps in NCHW memory (the same parameters and state_dict).

    Under bf16 autocast on a CPU, torch's GroupNorm kernels for channels_last maps are several times slower
    than for NCHW ones (the main job's hand extractor: 29 of its 52 ms a step on an AMD EPYC with
    AVX512-BF16, docs/results.md, session 25), while the convolutions want channels_last. Copying the map
    to NCHW and back costs less than the difference there; in float32 the channels_last kernel is kept.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.dim() == 4 and not x.is_contiguous() \
                and x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def _norm(channels: int, kind: str) -> nn.Module:
    """GroupNorm with up to 8 groups of at least 4 channels, or identity."""
    if kind == "none":
        return nn.Identity()
    groups = math.gcd(channels, 8)
    # One channel per group would be instance norm, which erases each channel's mean level (the
    # colour or depth offset); narrow CPU-sized nets get fewer, wider groups instead.
    while groups > 1 and channels // groups < 4:
        groups //= 2
    return GroupNorm(groups, channels)


def _conv_block(c_in: int, c_out: int, kernel: int, stride: int, norm: str) -> nn.Sequential:
    """Convolution, normalisation, ReLU; spatial size divided by stride."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=norm == "none"),
        _norm(c_out, norm),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """Basic ResNet block (two 3x3 convolutions) with a projection shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = _conv_block(c_in, c_out, 3, stride, norm)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=norm == "none")
        self.norm2 = _norm(c_out, norm)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), _norm(c_out, norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c_in, H, W) -> (B, c_out, H/stride, W/stride)."""
        return torch.relu(self.norm2(self.conv2(self.conv1(x))) + self.shortcut(x))


def _vgg_trunk(cfg: NetConfig) -> tuple[nn.Sequential, int]:
    """VGG-like convolutions, 5 stages each ending in 2x2 max pooling; returns (trunk, channels out)."""
    w = cfg.width
    layers: list[nn.Module] = []
    c_in = cfg.in_channels
    for c_out, n in zip((w, 2 * w, 4 * w, 8 * w, 8 * w), cfg.blocks, strict=True):
        for _ in range(n):
            layers.append(_conv_block(c_in, c_out, 3, 1, cfg.norm))
            c_in = c_out
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers), c_in


def _resnet_trunk(cfg: NetConfig) -> tuple[nn.Sequential, int]:
    """ResNet-like: 5x5 stem and max pooling, then 4 residual stages each halving the size; no global pooling."""
    w = cfg.width
    layers: list[nn.Module] = [_conv_block(cfg.in_channels, w, 5, 1, cfg.norm), nn.MaxPool2d(2)]
    c_in = w
    for c_out, n in zip((2 * w, 4 * w, 8 * w, 8 * w), cfg.blocks, strict=True):
        for i in range(n):
            layers.append(ResidualBlock(c_in, c_out, 2 if i == 0 else 1, cfg.norm))
            c_in = c_out
    return nn.Sequential(*layers), c_in


class FeatureExtractor(nn.Module):
    """f: convolutional trunk, then two FC layers to a feature_dim vector (post-ReLU)."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.trunk, channels = _vgg_trunk(cfg) if cfg.task == "objects" else _resnet_trunk(cfg)
        side = cfg.input_size // 32
        # Dropout only between the two FC layers: the feature itself is the target of the feature
        # loss and should not be randomly zeroed.
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * side * side, cfg.feature_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.feature_dim, cfg.feature_dim),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) images in [-1, 1] -> (B, feature_dim) features."""
        return self.fc(self.trunk(x))


class MappingBlock(nn.Module):
    """x + FC(ReLU(FC(x))); the last FC starts at zero so the block starts as the identity."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch alone: (B, D) -> (B, D)."""
        return self.fc2(torch.relu(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, D)."""
        return x + self.residual(x)


class Mapping(nn.Module):
    """g: residual blocks mapping real features onto synthetic ones; the identity at initialisation."""

    def __init__(self, dim: int, n_blocks: int = 2) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(MappingBlock(dim) for _ in range(n_blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) real features -> (B, D) mapped features."""
        return self.blocks(x)


def full_precision(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) with autocast off, in the module's own precision, as float32.

    The heads' outputs are poses, not features: under bf16 autocast (train.TrainConfig.amp) the
    extractor and the mapping run in bf16 and the heads in their float32 weights.
    """
    with torch.autocast(x.device.type, enabled=False):
        return module(x.to(next(module.parameters()).dtype)).float()


class Head(nn.Module):
    """h: one FC layer from features to normalised pose outputs."""

    def __init__(self, dim: int, n_outputs: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, n_outputs), float32."""
        return full_precision(self.fc, x)


class SpatialExtractor(nn.Module):
    """f for the spatial heads: a small U-Net; (B, C, S, S) -> (B, feature_dim, S/k, S/k) (post-ReLU), k = cfg.stride.

    Encoder stages of width (w, 2w, 4w, 8w) with cfg.blocks[:4] convolutions each, at S, S/2, S/4,
    S/8; the decoder upsamples with skip connections to S/2 (stride 2, the dense head's
    DENSE_STRIDE) or once to S/4 (stride 4). Every output
    location sees the whole 64x64 crop (receptive field over 100 px), and the map is translation
    equivariant, so a shifted object gives shifted correspondences: what makes it sample-efficient
    next to a global FC feature.
    """

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        w, n = cfg.width, cfg.blocks
        widths = (w, 2 * w, 4 * w, 8 * w)
        self.enc = nn.ModuleList()
        c_in = cfg.in_channels
        for c_out, k in zip(widths, n[:4], strict=True):
            self.enc.append(nn.Sequential(*(_conv_block(c_in if i == 0 else c_out, c_out, 3, 1, cfg.norm)
                                            for i in range(k))))
            c_in = c_out
        self.pool = nn.MaxPool2d(2)
        self.stride = int(cfg.stride)
        s4 = self.stride == 4
        # S/8 -> S/4, then (stride 2) S/4 -> S/2
        self.up3 = _conv_block(widths[3] + widths[2], cfg.feature_dim if s4 else widths[2], 3, 1, cfg.norm)
        self.up2 = None if s4 else _conv_block(widths[2] + widths[1], cfg.feature_dim, 3, 1, cfg.norm)
        self.out = _conv_block(cfg.feature_dim, cfg.feature_dim, 3, 1, cfg.norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) images in [-1, 1] -> (B, feature_dim, S/stride, S/stride)."""
        skips = []
        for i, stage in enumerate(self.enc):
            x = stage(x if i == 0 else self.pool(x))
            skips.append(x)
        up = nn.functional.interpolate
        x = self.up3(torch.cat([up(x, scale_factor=2.0, mode="nearest"), skips[2]], 1))
        if self.up2 is not None:
            x = self.up2(torch.cat([up(x, scale_factor=2.0, mode="nearest"), skips[1]], 1))
        return self.out(x)


class SpatialMappingBlock(nn.Module):
    """x + conv3x3(ReLU(conv3x3(x))) on a feature map; the last convolution starts at zero (identity)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, D, H, W)."""
        return x + self.conv2(torch.relu(self.conv1(x)))


class DenseHead(nn.Module):
    """h of the spatial object heads (dense, keypoints): a 1x1 convolution, their channels per object everywhere.

    With coord_bins (the dense head), the convolution gives per object a visibility logit and, per model
    coordinate, coord_bins logits over bins spanning [-1, 1]: train_outputs() returns them (what the loss
    reads), forward() their expectation, so the outputs keep the layout the decoding reads (DENSE_CHANNELS).
    """

    def __init__(self, dim: int, n_outputs: int, coord_bins: int = 0, per_object: int = DENSE_CHANNELS) -> None:
        super().__init__()
        self.bins = int(coord_bins)
        n_objects = n_outputs // per_object
        self.per_object = per_object if not self.bins else 1 + 3 * self.bins  # channels of one object
        self.conv = nn.Conv2d(dim, n_outputs if not self.bins else n_objects * self.per_object, 1)

    def train_outputs(self, x: torch.Tensor, obj_index: torch.Tensor | None = None,
                      n_objects: int | None = None) -> torch.Tensor:
        """(B, D, H, W) -> the convolution's (B, channels, H, W), float32: what the training loss reads.

        With obj_index (B,), only each sample's own object's channels, (B, channels / n_objects, H, W):
        the loss reads no other, and a multi-object head then costs what a one-object head does.
        n_objects: the head's objects (a checkpoint's objects list; a keypoint head's channels per object
        depend on its keypoints); None: the count per_object implies.
        """
        n = n_objects or self.conv.out_channels // self.per_object
        if obj_index is None or n == 1:
            return full_precision(self.conv, x)
        per = self.conv.out_channels // n
        with torch.autocast(x.device.type, enabled=False):
            w = self.conv.weight.view(n, per, -1)[obj_index.long()]
            b = self.conv.bias.view(n, per)[obj_index.long()]
            return (torch.einsum("bpd,bdhw->bphw", w.float(), x.float()) + b.float()[:, :, None, None]).float()

    def forward(self, x: torch.Tensor, obj_index: torch.Tensor | None = None,
                n_objects: int | None = None) -> torch.Tensor:
        """(B, D, H, W) -> (B, n_outputs, H, W), float32; with obj_index (B,), only each sample's own
        object's outputs, (B, n_outputs / n_objects, H, W): the run time's readout, which then costs
        what a one-object head's does (with bins, the softmax over them is most of the head's time)."""
        out = self.train_outputs(x, obj_index, n_objects)
        return binned_to_coordinates(out, self.bins) if self.bins else out


class VoteHead(nn.Module):
    """h for the vote head: every location of a feature map votes for every joint (A2J-like integral regression).

    A 1x1 convolution gives, per joint and location, a weight logit and a 3D offset. A joint is the
    softmax-weighted mean over locations of (location + offset): x, y are the location's crop
    coordinates in [-1, 1] (the cube's x, y over its half edge, as the crop views the cube) plus the
    offset, z is the offset alone. Outputs are cube-normalised joints (B, 3J), the same as the FC
    head's, so losses, the estimator and the export do not depend on the head. The offsets start
    at zero, so at initialisation every joint is a soft-argmax over the map.
    """

    def __init__(self, dim: int, n_outputs: int) -> None:
        super().__init__()
        self.n_joints = n_outputs // 3
        self.weights = nn.Conv2d(dim, self.n_joints, 1)
        self.offsets = nn.Conv2d(dim, 3 * self.n_joints, 1)
        nn.init.zeros_(self.offsets.weight)
        nn.init.zeros_(self.offsets.bias)

    @staticmethod
    def grid(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(2, H*W) crop coordinates in [-1, 1] (x right, y down) of the location centres of an H x W map."""
        ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) * (2.0 / height) - 1.0
        xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) * (2.0 / width) - 1.0
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([gx.reshape(-1), gy.reshape(-1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, 3J) float32 joints over half the cube, ordered (x, y, z) per joint."""
        b, _, h, w = x.shape
        weights = torch.softmax(full_precision(self.weights, x).reshape(b, self.n_joints, 1, h * w), dim=-1)
        votes = full_precision(self.offsets, x).reshape(b, self.n_joints, 3, h * w)
        grid = self.grid(h, w, x.device, votes.dtype)
        anchors = torch.cat([grid, torch.zeros_like(grid[:1])]).expand(b, self.n_joints, 3, h * w)
        joints = ((anchors + votes) * weights).sum(dim=-1)  # (B, J, 3)
        return joints.reshape(b, 3 * self.n_joints)


def pooled_features(features: torch.Tensor) -> torch.Tensor:
    """(B, D) vectors as they are; (B, D, H, W) feature maps averaged over locations to (B, D)."""
    return features.mean(dim=(2, 3)) if features.dim() == 4 else features


@dataclass
class Prediction:
    """Run-time result: normalised pose outputs (B, n_outputs) and the features h saw (B, D)."""

    outputs: torch.Tensor
    features: torch.Tensor


class FeatureMappingModel(nn.Module):
    """f_S and h, plus g (and f_R unless cfg.shared_extractor) when cfg.mapping; baselines use f_S for every image."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        extractor = SpatialExtractor if cfg.spatial else FeatureExtractor
        self.f_S: nn.Module = extractor(cfg)
        if cfg.head in SPATIAL_OBJECT_HEADS:
            self.h: nn.Module = DenseHead(cfg.feature_dim, cfg.n_outputs, cfg.coord_bins,
                                          per_object=object_head_channels(cfg.head))
        else:
            self.h = (VoteHead if cfg.head == "vote" else Head)(cfg.feature_dim, cfg.n_outputs)
        self.f_R: nn.Module | None = extractor(cfg) if cfg.mapping and not cfg.shared_extractor else None
        self.g: nn.Module | None = None
        if cfg.mapping:
            self.g = (nn.Sequential(*(SpatialMappingBlock(cfg.feature_dim) for _ in range(cfg.mapping_blocks)))
                      if cfg.spatial else Mapping(cfg.feature_dim, cfg.mapping_blocks))

    def init_real_from_syn(self) -> None:
        """Copy f_S's weights into f_R (the start of the mapping stage)."""
        if self.f_R is None:
            raise ValueError("this model has no f_R: build it with NetConfig(mapping=True, shared_extractor=False)")
        self.f_R.load_state_dict(self.f_S.state_dict())

    def features_syn(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) synthetic images -> (B, D) features f_S(x)."""
        return self.f_S(x)

    def features_real(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) real images -> (B, D): g(f_R(x)) with a mapping (g(f_S(x)) when f is shared), else f_S(x)."""
        if self.g is None:
            return self.f_S(x)
        return self.g((self.f_S if self.f_R is None else self.f_R)(x))

    def predict_real(self, x: torch.Tensor, objects: torch.Tensor | None = None,
                     n_objects: int | None = None) -> Prediction:
        """Run-time path for real images: h(g(f_R(x))), or h(f_S(x)) for baselines.

        objects (B,): each crop's object index in [0, n_objects) (an object model's; not checked here, so
        the graph exports as it is: the backends check them, backends.checked_objects): the outputs are then
        only that object's, (B, n_outputs / n_objects, ...), and the dense and keypoint heads compute no
        other object's channels. n_objects: the checkpoint's objects (None: what the head's config implies,
        right for every head the experiments train).
        """
        features = self.features_real(x)
        if objects is None:
            return Prediction(self.h(features), features)
        if self.cfg.task != "objects":
            raise ValueError(f"objects are an object model's crop labels; this model's task is {self.cfg.task!r}")
        if isinstance(self.h, DenseHead):
            return Prediction(self.h(features, objects.long(), n_objects), features)
        out = self.h(features)  # bb8: (B, n_outputs), every object's corners from one FC layer
        per = self.cfg.n_outputs // n_objects if n_objects else object_head_channels(self.cfg.head)
        rows = objects.long()[:, None] * per + torch.arange(per, device=out.device)
        return Prediction(out.gather(1, rows), features)

    def predict_syn(self, x: torch.Tensor) -> Prediction:
        """Synthetic images: h(f_S(x))."""
        features = self.features_syn(x)
        return Prediction(self.h(features), features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) real images -> (B, n_outputs): the run-time path, for tracing and export."""
        return self.predict_real(x).outputs


@dataclass
class ExemplarBank:
    """Non-parametric predictor: features f_S (N, D) of synthetic exemplars and their targets (N, n_outputs)."""

    features: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        if self.features.dim() != 2 or self.targets.dim() != 2 or len(self.features) != len(self.targets):
            raise ValueError(f"need (N, D) and (N, K), got {tuple(self.features.shape)}, {tuple(self.targets.shape)}")

    @torch.no_grad()
    def predict(self, query: torch.Tensor, k: int = 1, chunk: int = 4096) -> torch.Tensor:
        """(B, D) query features -> (B, n_outputs): the target of the nearest exemplar (mean of k nearest).

        Query with model.features_real(x): the mapped feature when the model has g, so real
        images are compared in the synthetic feature space.
        """
        feats = self.features.to(query.device, query.dtype)
        best_d = torch.full((len(query), k), float("inf"), device=query.device)
        best_i = torch.zeros((len(query), k), dtype=torch.long, device=query.device)
        # Chunks over the bank keep the distance matrix small for banks of a million exemplars.
        for start in range(0, len(feats), chunk):
            d = torch.cdist(query, feats[start : start + chunk])
            d_all = torch.cat([best_d, d], dim=1)
            i_all = torch.cat([best_i, torch.arange(start, start + d.shape[1], device=query.device).expand_as(d)], 1)
            best_d, pos = d_all.topk(k, dim=1, largest=False)
            best_i = i_all.gather(1, pos)
        return self.targets.to(query.device, query.dtype)[best_i].mean(dim=1)
