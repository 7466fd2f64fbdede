"""BiSeNetV2 (Yu et al., IJCV 2021, arXiv 2004.02147) with its four auxiliary heads.

Two branches look at the image side by side:

- the detail branch (wide channels, shallow, stride 8) keeps spatial detail;
- the semantic branch (narrow channels, deep, stride 32) gathers context: a stem,
  gather-and-expansion (GE) layers and a context-embedding block.

Bilateral guided aggregation (BGA) lets each branch gate the other and fuses them at 1/8
of the input size; the segment head turns that into class logits at input size.
In training, four auxiliary heads on the stem (1/4), S3 (1/8), S4 (1/16) and S5_4 (1/32)
add deep supervision; in eval mode they are not run at all.

Inputs of any size work: sides that are not multiples of 32 are zero-padded on the
bottom/right (the input is already normalised, so zero is the mean colour) and the
logits are cropped back. Inputs whose sides are multiples of 32 skip the padding.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from seg.errors import ConfigError
from seg.models.convert import convert_backbone
from seg.models.upsample import HEAD_UPSAMPLE_MODES, upsample_bilinear_matmul
from seg.models.weights import load_into, load_weights, read_weights_file

#: Total stride of the semantic branch; input sides are padded to a multiple of it.
OUTPUT_STRIDE = 32
#: Auxiliary head name (key of the training output) -> (semantic-branch feature it reads,
#: its channels, its stride = the head's upsampling factor).
AUX_HEADS: dict[str, tuple[str, int, int]] = {
    "aux2": ("stem", 16, 4),
    "aux3": ("s3", 32, 8),
    "aux4": ("s4", 64, 16),
    "aux5_4": ("s5_4", 128, 32),  # before the context embedding
}
#: Top-level modules of the backbone (the two branches), for backbone-only loading.
BACKBONE_MODULES = ("detail", "semantic")
#: How the bilateral guided aggregation upsamples its two 1/32 paths by 4.
BGA_UPSAMPLE_MODES = ("bilinear", "nearest")


class ConvBN(nn.Sequential):
    """Conv (no bias) + BatchNorm, with an optional ReLU; ``padding`` keeps size at stride 1."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        relu: bool = True,
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv=nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                groups=groups,
                bias=False,
            ),
            bn=nn.BatchNorm2d(out_channels),
        )
        if relu:
            layers["relu"] = nn.ReLU(inplace=True)
        super().__init__(layers)


class DetailBranch(nn.Module):
    """Three stages of 3x3 ConvBNReLU: N x 3 x H x W -> N x 128 x H/8 x W/8."""

    def __init__(self) -> None:
        super().__init__()
        self.s1 = nn.Sequential(ConvBN(3, 64, stride=2), ConvBN(64, 64))
        self.s2 = nn.Sequential(ConvBN(64, 64, stride=2), ConvBN(64, 64), ConvBN(64, 64))
        self.s3 = nn.Sequential(ConvBN(64, 128, stride=2), ConvBN(128, 128), ConvBN(128, 128))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.s3(self.s2(self.s1(x)))


class StemBlock(nn.Module):
    """Semantic-branch stem: N x 3 x H x W -> N x 16 x H/4 x W/4.

    After a strided 3x3 conv, a conv path (1x1 squeeze, strided 3x3) and a max-pool path
    downsample side by side; their concatenation is fused by a 3x3 conv.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = ConvBN(3, 16, stride=2)
        self.conv_path = nn.Sequential(ConvBN(16, 8, kernel_size=1), ConvBN(8, 16, stride=2))
        self.pool_path = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.fuse = ConvBN(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.fuse(torch.cat([self.conv_path(x), self.pool_path(x)], dim=1))


class GatherExpand(nn.Module):
    """Gather-and-expansion layer: N x C_in x H x W -> N x C_out x H/s x W/s, s in {1, 2}.

    3x3 conv gathers, depthwise 3x3 conv(s) expand to ``expansion * C_in`` channels,
    1x1 conv projects back; a residual connection (identity at stride 1, a depthwise +
    1x1 shortcut at stride 2) is added before the final ReLU. The last BN of the main
    path is marked ``zero_init`` so that each block starts as (nearly) the identity.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, expansion: int = 6
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"GatherExpand stride must be 1 or 2, got {stride}")
        if stride == 1 and in_channels != out_channels:
            raise ValueError("GatherExpand at stride 1 needs in_channels == out_channels")
        mid = in_channels * expansion
        self.gather = ConvBN(in_channels, in_channels)
        if stride == 1:
            self.expand = ConvBN(in_channels, mid, groups=in_channels)
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.expand = nn.Sequential(
                ConvBN(in_channels, mid, stride=2, groups=in_channels, relu=False),
                ConvBN(mid, mid, groups=mid),
            )
            self.shortcut = nn.Sequential(
                ConvBN(in_channels, in_channels, stride=2, groups=in_channels, relu=False),
                ConvBN(in_channels, out_channels, kernel_size=1, relu=False),
            )
        self.project = ConvBN(mid, out_channels, kernel_size=1, relu=False)
        self.project.bn.zero_init = True  # read by BiSeNetV2.init_weights
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.project(self.expand(self.gather(x))) + self.shortcut(x))


class ContextEmbedding(nn.Module):
    """Global context: N x 128 x h x w -> N x 128 x h x w.

    Global average pool -> BN -> 1x1 ConvBNReLU, broadcast-added to the input, then 3x3 conv.
    """

    def __init__(self, channels: int = 128) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv_gap = ConvBN(channels, channels, kernel_size=1)
        self.conv_last = ConvBN(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.conv_gap(self.bn(x.mean(dim=(2, 3), keepdim=True)))
        return self.conv_last(x + context)


class SemanticBranch(nn.Module):
    """Stem, GE layers and context embedding.

    Returns the features the heads need, ``{"stem": N x 16 x H/4 x W/4, "s3": N x 32 x H/8
    x W/8, "s4": N x 64 x H/16 x W/16, "s5_4": N x 128 x H/32 x W/32, "s5_5": N x 128 x
    H/32 x W/32}``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = StemBlock()
        self.s3 = nn.Sequential(GatherExpand(16, 32, stride=2), GatherExpand(32, 32))
        self.s4 = nn.Sequential(GatherExpand(32, 64, stride=2), GatherExpand(64, 64))
        self.s5_4 = nn.Sequential(
            GatherExpand(64, 128, stride=2), *(GatherExpand(128, 128) for _ in range(3))
        )
        self.s5_5 = ContextEmbedding(128)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        stem = self.stem(x)
        s3 = self.s3(stem)
        s4 = self.s4(s3)
        s5_4 = self.s5_4(s4)
        return {"stem": stem, "s3": s3, "s4": s4, "s5_4": s5_4, "s5_5": self.s5_5(s5_4)}


class BilateralGuidedAggregation(nn.Module):
    """Fuse detail (N x 128 x h x w, 1/8) and semantic (N x 128 x h/4 x w/4, 1/32) features.

    Each branch is gated by a sigmoid of the other at its own resolution; the semantic
    gate and the semantic result are upsampled x4 (``upsample``: "bilinear" or "nearest")
    and the sum passes a 3x3 ConvBNReLU. Output: N x 128 x h x w.

    ``upsample="nearest"`` is CoinCheung/BiSeNet's ``nn.Upsample(scale_factor=4)``;
    mmsegmentation upsamples bilinearly and gives the two 1x1 convolutions after the
    depthwise convs a bias (``pointwise_bias=True``).
    """

    def __init__(
        self, channels: int = 128, upsample: str = "bilinear", pointwise_bias: bool = False
    ) -> None:
        super().__init__()
        if upsample not in BGA_UPSAMPLE_MODES:
            raise ConfigError(
                f"model.bga_upsample must be one of {list(BGA_UPSAMPLE_MODES)}, got {upsample!r}"
            )
        self.upsample = upsample
        self.detail_keep = nn.Sequential(
            ConvBN(channels, channels, groups=channels, relu=False),
            nn.Conv2d(channels, channels, 1, bias=pointwise_bias),
        )
        self.detail_down = nn.Sequential(
            ConvBN(channels, channels, stride=2, relu=False),
            nn.AvgPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.semantic_up = ConvBN(channels, channels, relu=False)
        self.semantic_keep = nn.Sequential(
            ConvBN(channels, channels, groups=channels, relu=False),
            nn.Conv2d(channels, channels, 1, bias=pointwise_bias),
        )
        self.fuse = ConvBN(channels, channels)

    def _up4(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample == "nearest":
            return F.interpolate(x, scale_factor=4.0, mode="nearest")
        return F.interpolate(x, scale_factor=4.0, mode="bilinear", align_corners=False)

    def forward(self, detail: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        semantic_gate = self._up4(self.semantic_up(semantic))
        at_detail = self.detail_keep(detail) * torch.sigmoid(semantic_gate)
        at_semantic = self.detail_down(detail) * torch.sigmoid(self.semantic_keep(semantic))
        return self.fuse(at_detail + self._up4(at_semantic))


class SegmentHead(nn.Module):
    """Class logits from features at stride ``upsample``: N x C_in x h x w -> N x K x h*f x w*f.

    Main head: 3x3 ConvBNReLU to ``hidden`` channels, dropout, 1x1 conv to classes,
    bilinear upsampling by ``upsample``. Auxiliary heads (``aux=True``) add a nearest x2
    upsampling and a 3x3 ConvBNReLU to ``upsample**2`` channels before the classifier, then
    upsample by ``upsample / 2``. ``upsample_mode``: ``interpolate`` (F.interpolate) or
    ``matmul`` (two matrix products, same values: seg.models.upsample).
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        num_classes: int,
        upsample: int,
        aux: bool = False,
        upsample_mode: str = "interpolate",
    ) -> None:
        super().__init__()
        if upsample_mode not in HEAD_UPSAMPLE_MODES:
            raise ConfigError(
                f"model.head_upsample must be one of {list(HEAD_UPSAMPLE_MODES)}, "
                f"got {upsample_mode!r}"
            )
        self.upsample_mode = upsample_mode
        self.conv = ConvBN(in_channels, hidden)
        self.drop = nn.Dropout(0.1)
        if aux:
            refine_channels = upsample * upsample
            self.refine: nn.Module = nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="nearest"), ConvBN(hidden, refine_channels)
            )
            self.upsample = upsample // 2
        else:
            refine_channels = hidden
            self.refine = nn.Identity()
            self.upsample = upsample
        self.classifier = nn.Conv2d(refine_channels, num_classes, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.refine(self.drop(self.conv(x))))
        if self.upsample_mode == "matmul":
            return upsample_bilinear_matmul(logits, self.upsample)
        return F.interpolate(
            logits, scale_factor=float(self.upsample), mode="bilinear", align_corners=False
        )


def _is_exporting() -> bool:
    """True while torch.export / the ONNX exporter trace the model (shapes are symbolic)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(torch.onnx.is_in_onnx_export() or (is_exporting is not None and is_exporting()))


def pad_to_multiple(images: torch.Tensor, multiple: int = OUTPUT_STRIDE) -> torch.Tensor:
    """Zero-pad N x 3 x H x W on the bottom/right so that H and W are multiples of ``multiple``.

    Returns ``images`` itself when no padding is needed (the common case costs nothing).
    While exporting, the pad is always emitted (possibly of size zero) so that the graph
    stays valid for every input size.
    """
    height, width = images.shape[-2], images.shape[-1]
    pad_h = (multiple - height % multiple) % multiple
    pad_w = (multiple - width % multiple) % multiple
    if not _is_exporting() and pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, [0, pad_w, 0, pad_h])


class BiSeNetV2(nn.Module):
    """BiSeNetV2 for ``num_classes`` classes.

    Input: float N x 3 x H x W (normalised), any H and W, NCHW or channels_last.
    Output: in train mode a dict ``{"main", "aux2", "aux3", "aux4", "aux5_4"}`` of
    N x num_classes x H x W logits (only ``"main"`` with ``aux_heads=False``); in eval mode
    the main N x num_classes x H x W logits tensor, without running the auxiliary heads.

    Args:
        num_classes: number of output classes.
        aux_heads: build the four auxiliary heads (False for deployment).
        weights: optional local file (raw state dict, or a checkpoint with a ``"model"``
            or ``"state_dict"`` entry) loaded after initialisation with
            :func:`seg.models.weights.load_into`; auxiliary-head entries are dropped when
            ``aux_heads`` is False.
        weights_prefix: prefix that the keys in ``weights`` carry and that is stripped
            (keys without it are ignored), e.g. ``"backbone."``.
        backbone_only: load only the detail and semantic branches from ``weights``.
        weights_strict: a ``weights`` or ``backbone_weights`` file that does not fit
            exactly (missing, unexpected or mis-shaped keys) is an error; with False what
            fits is loaded and what was skipped is logged. Either way, a ``weights`` file
            whose head classifiers alone predict another class count is loaded with those
            classifiers re-initialised (:meth:`classifier_modules`; logged).
        backbone_weights: optional local file in the layout of CoinCheung/BiSeNet's
            ImageNet-pretrained ``backbone_v2.pth`` (a dict with ``"detail"`` and
            ``"segment"`` state dicts), loaded into the two branches before ``weights``.
        bga_upsample: "bilinear" (default, the behaviour of earlier seg checkpoints and of
            mmsegmentation) or "nearest" (CoinCheung/BiSeNet) upsampling in the BGA layer.
        bga_pointwise_bias: give the BGA's two 1x1 convolutions a bias (mmsegmentation).
        head_upsample: how the heads upsample their logits to the input size:
            "interpolate" (F.interpolate, default) or "matmul" (the same bilinear values as
            two matrix products, whose backward needs no atomic adds on GPUs).
    """

    def __init__(
        self,
        num_classes: int,
        aux_heads: bool = True,
        weights: str | None = None,
        weights_prefix: str = "",
        backbone_only: bool = False,
        weights_strict: bool = True,
        backbone_weights: str | None = None,
        bga_upsample: str = "bilinear",
        bga_pointwise_bias: bool = False,
        head_upsample: str = "interpolate",
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.detail = DetailBranch()
        self.semantic = SemanticBranch()
        self.bga = BilateralGuidedAggregation(128, bga_upsample, bga_pointwise_bias)
        self.head = SegmentHead(128, 1024, num_classes, upsample=8, upsample_mode=head_upsample)
        self.aux_heads: nn.ModuleDict | None = None
        if aux_heads:
            self.aux_heads = nn.ModuleDict(
                {
                    name: SegmentHead(
                        channels, 128, num_classes, factor, aux=True, upsample_mode=head_upsample
                    )
                    for name, (_feature, channels, factor) in AUX_HEADS.items()
                }
            )
        self.init_weights()
        if backbone_weights is not None:
            self.load_backbone(backbone_weights, strict=weights_strict)
        if weights is not None:
            load_weights(
                self,
                weights,
                prefix=weights_prefix,
                only=BACKBONE_MODULES if backbone_only else None,
                strict=weights_strict,
                settings={"bga_upsample": bga_upsample, "bga_pointwise_bias": bga_pointwise_bias},
                classifiers=self.classifier_modules(),
            )

    def classifier_modules(self) -> list[str]:
        """Names of the 1x1 convolutions that map features to class logits: the
        ``classifier`` of the main head and of each auxiliary head, the only layers whose
        shape depends on ``num_classes``. ``model.weights=`` from a file with another class
        count re-initialises exactly these (:func:`seg.models.weights.load_into`)."""
        return [
            f"{name}.classifier"
            for name, module in self.named_modules()
            if isinstance(module, SegmentHead)
        ]

    def load_backbone(self, path: str, strict: bool = True) -> None:
        """Load a ``backbone_v2.pth``-layout file (``{"detail": sd, "segment": sd}`` in
        CoinCheung/BiSeNet's names) into the detail and semantic branches."""
        converted = convert_backbone(read_weights_file(path), str(path))
        branches = nn.ModuleDict({name: self.get_submodule(name) for name in BACKBONE_MODULES})
        load_into(branches, converted.state, path, strict=strict)

    def init_weights(self) -> None:
        """Kaiming-normal convolutions (fan_out), zero biases, BN at 1/0, zero-init BNs,
        and small classifiers.

        The BN that ends each GE layer's main path starts with weight 0 so that each
        residual block starts close to its shortcut, which steadies early training. The
        final 1x1 classifier of every head is drawn with std 0.01 (mmsegmentation's
        convention for segmentation classifiers): with Kaiming init its logits start with
        a std of about 5 and each head's cross-entropy near 10 instead of ln(C).
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                if getattr(module, "zero_init", False):
                    nn.init.zeros_(module.weight)
                else:
                    nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, SegmentHead):
                nn.init.normal_(module.classifier.weight, std=0.01)

    def forward(self, images: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        if self.training and self.semantic.s5_5.bn.training and images.shape[0] < 2:
            # BN of the context-embedding block sees one value per channel per image.
            raise ConfigError(
                f"BiSeNetV2 trains with at least 2 images per device (batch norm of the "
                f"global context), got a batch of {images.shape[0]}"
            )
        height, width = images.shape[-2], images.shape[-1]
        padded = pad_to_multiple(images, OUTPUT_STRIDE)
        detail = self.detail(padded)
        semantic = self.semantic(padded)
        fused = self.bga(detail, semantic["s5_5"])
        main = self.head(fused)[..., :height, :width]
        if not self.training:
            return main
        outputs = {"main": main}
        if self.aux_heads is not None:
            for name, head in self.aux_heads.items():
                feature = semantic[AUX_HEADS[name][0]]
                outputs[name] = head(feature)[..., :height, :width]
        return outputs
