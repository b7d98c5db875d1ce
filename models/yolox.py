"""YOLOX-nano (Megvii, Apache-2.0) in torch, behind torchvision's detector contract.

The network is YOLOX's own (depth 0.33, width 0.25, depthwise convolutions, SiLU):
a CSPDarknet backbone with a Focus stem and an SPP block, a PAFPN neck and the
decoupled YOLOXHead on strides 8/16/32. Module names follow the YOLOX repository
(``backbone.backbone.dark2.0.dconv.conv``, ``head.cls_preds.0``), so its
checkpoints map one to one, except for one difference: the only original we have
is an ONNX export with every BatchNorm folded into the convolution before it, so
each conv here has a bias and there is no BatchNorm. :mod:`models.convert.yolox_onnx`
converts that file.

In eval mode :class:`YOLOX` takes a list of CHW float RGB images in [0, 1] of any
sizes and returns per image ``{"boxes": (K, 4) x1y1x2y2 in the image's pixels,
"labels": (K,), "scores": (K,)}``. Inside it does what the YOLOX demo does: BGR,
0..255, no mean/std, letterbox to ``input_size`` (aspect kept, top-left, padded
with 114), then per anchor point the best class with score = objectness x class
probability, the score cut, class-aware NMS and the best ``detections_per_img``.

With ``rect`` the letterbox is cut to the image instead of the square: the image is
scaled exactly as into ``input_size`` but padded only to the next multiple of 32 (a
16:9 frame in 320x320 runs at 192x320, half the work). The network is convolutional
(SPP's pools are local), so the boxes are those of the square letterbox but for the
cells that saw its padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from blinkflow.models.classes import coco80_to_category_id
from blinkflow.models.registry import MAX_INPUT_SIDE

STRIDES = (8, 16, 32)
#: the letterbox canvas value of the YOLOX demo (and of its training augmentation)
PAD_VALUE = 114.0
#: the export's pixels are 0..255; the network here takes 0..1 and its stem weights are 255 times the export's
PIXEL_SCALE = 255.0
COCO_NUM_CLASSES = 91  # torchvision's COCO convention: category ids 0..90, 0 = background


class ConvAct(nn.Module):
    """YOLOX's BaseConv (conv, BN, SiLU) with the BN folded into the conv's bias."""

    def __init__(self, cin: int, cout: int, ksize: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, ksize, stride, padding=(ksize - 1) // 2, groups=groups, bias=True)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))


class DWConv(nn.Module):
    """Depthwise k x k then pointwise 1 x 1, each with SiLU."""

    def __init__(self, cin: int, cout: int, ksize: int, stride: int = 1) -> None:
        super().__init__()
        self.dconv = ConvAct(cin, cin, ksize, stride, groups=cin)
        self.pconv = ConvAct(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pconv(self.dconv(x))


class Bottleneck(nn.Module):
    def __init__(self, channels: int, shortcut: bool) -> None:
        super().__init__()
        self.conv1 = ConvAct(channels, channels, 1)
        self.conv2 = DWConv(channels, channels, 3)
        self.use_add = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(self.conv1(x))
        return y + x if self.use_add else y


class CSPLayer(nn.Module):
    """Half the channels through ``n`` bottlenecks, half around them, then a 1x1 merge."""

    def __init__(self, cin: int, cout: int, n: int, shortcut: bool = True) -> None:
        super().__init__()
        hidden = cout // 2
        self.conv1 = ConvAct(cin, hidden, 1)
        self.conv2 = ConvAct(cin, hidden, 1)
        self.conv3 = ConvAct(2 * hidden, cout, 1)
        self.m = nn.Sequential(*[Bottleneck(hidden, shortcut) for _ in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(torch.cat([self.m(self.conv1(x)), self.conv2(x)], dim=1))


class SPPBottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, kernel_sizes: tuple[int, ...] = (5, 9, 13)) -> None:
        super().__init__()
        hidden = cin // 2
        self.conv1 = ConvAct(cin, hidden, 1)
        self.m = nn.ModuleList([nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernel_sizes])
        self.conv2 = ConvAct(hidden * (len(kernel_sizes) + 1), cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        return self.conv2(torch.cat([x, *(pool(x) for pool in self.m)], dim=1))


class Focus(nn.Module):
    """Space-to-depth (each 2x2 block to 4 channels) and a 3x3 conv."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = ConvAct(cin * 4, cout, 3)

    def forward(self, x: Tensor) -> Tensor:
        # YOLOX's channel order: top-left, bottom-left, top-right, bottom-right
        parts = (x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2])
        return self.conv(torch.cat(parts, dim=1))


class CSPDarknet(nn.Module):
    """Returns the stride 8, 16 and 32 features ("dark3", "dark4", "dark5")."""

    def __init__(self, depth: float, width: float) -> None:
        super().__init__()
        c = int(width * 64)
        n = max(round(depth * 3), 1)
        self.stem = Focus(3, c)
        self.dark2 = nn.Sequential(DWConv(c, c * 2, 3, 2), CSPLayer(c * 2, c * 2, n))
        self.dark3 = nn.Sequential(DWConv(c * 2, c * 4, 3, 2), CSPLayer(c * 4, c * 4, n * 3))
        self.dark4 = nn.Sequential(DWConv(c * 4, c * 8, 3, 2), CSPLayer(c * 8, c * 8, n * 3))
        self.dark5 = nn.Sequential(
            DWConv(c * 8, c * 16, 3, 2), SPPBottleneck(c * 16, c * 16), CSPLayer(c * 16, c * 16, n, shortcut=False)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.dark2(self.stem(x))
        dark3 = self.dark3(x)
        dark4 = self.dark4(dark3)
        return dark3, dark4, self.dark5(dark4)


class PAFPN(nn.Module):
    """Top-down then bottom-up fusion of the backbone's three levels (YOLOPAFPN)."""

    def __init__(self, depth: float, width: float) -> None:
        super().__init__()
        c3, c4, c5 = (int(ch * width) for ch in (256, 512, 1024))
        n = round(3 * depth)
        self.backbone = CSPDarknet(depth, width)
        self.lateral_conv0 = ConvAct(c5, c4, 1)
        self.C3_p4 = CSPLayer(2 * c4, c4, n, shortcut=False)
        self.reduce_conv1 = ConvAct(c4, c3, 1)
        self.C3_p3 = CSPLayer(2 * c3, c3, n, shortcut=False)
        self.bu_conv2 = DWConv(c3, c3, 3, 2)
        self.C3_n3 = CSPLayer(2 * c3, c4, n, shortcut=False)
        self.bu_conv1 = DWConv(c4, c4, 3, 2)
        self.C3_n4 = CSPLayer(2 * c4, c5, n, shortcut=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dark3, dark4, dark5 = self.backbone(x)
        fpn_out0 = self.lateral_conv0(dark5)
        f_out0 = self.C3_p4(torch.cat([_upsample(fpn_out0), dark4], dim=1))
        fpn_out1 = self.reduce_conv1(f_out0)
        pan_out2 = self.C3_p3(torch.cat([_upsample(fpn_out1), dark3], dim=1))
        pan_out1 = self.C3_n3(torch.cat([self.bu_conv2(pan_out2), fpn_out1], dim=1))
        pan_out0 = self.C3_n4(torch.cat([self.bu_conv1(pan_out1), fpn_out0], dim=1))
        return pan_out2, pan_out1, pan_out0


def _upsample(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class YOLOXHead(nn.Module):
    """Decoupled head: per level a 1x1 stem, then two 3x3 branches (classes; box and objectness)."""

    def __init__(self, num_classes: int, width: float) -> None:
        super().__init__()
        hidden = int(256 * width)
        in_channels = [int(ch * width) for ch in (256, 512, 1024)]
        self.stems = nn.ModuleList([ConvAct(ch, hidden, 1) for ch in in_channels])
        self.cls_convs = nn.ModuleList([self._branch(hidden) for _ in in_channels])
        self.reg_convs = nn.ModuleList([self._branch(hidden) for _ in in_channels])
        self.cls_preds = nn.ModuleList([nn.Conv2d(hidden, num_classes, 1) for _ in in_channels])
        self.reg_preds = nn.ModuleList([nn.Conv2d(hidden, 4, 1) for _ in in_channels])
        self.obj_preds = nn.ModuleList([nn.Conv2d(hidden, 1, 1) for _ in in_channels])

    @staticmethod
    def _branch(channels: int) -> nn.Sequential:
        return nn.Sequential(DWConv(channels, channels, 3), DWConv(channels, channels, 3))

    def forward(self, features: tuple[Tensor, ...]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per level (box (N, 4, H, W), objectness logit (N, 1, H, W), class logits (N, C, H, W))."""
        outputs = []
        for k, x in enumerate(features):
            x = self.stems[k](x)
            cls_feat = self.cls_convs[k](x)
            reg_feat = self.reg_convs[k](x)
            outputs.append((self.reg_preds[k](reg_feat), self.obj_preds[k](reg_feat), self.cls_preds[k](cls_feat)))
        return outputs


class YOLOX(nn.Module):
    """YOLOX detector; ``num_classes`` counts the background, as torchvision's detectors do.

    With ``num_classes == 91`` the head predicts the 80 COCO classes and labels are
    COCO category ids (indices into :func:`models.classes.coco_categories`);
    otherwise the head has ``num_classes - 1`` outputs and label = head index + 1.
    """

    #: the letterbox's padding in the RGB [0, 1] pixels the model takes (a canvas built outside pads with it)
    pad_value = PAD_VALUE / PIXEL_SCALE

    def __init__(
        self, num_classes: int = COCO_NUM_CLASSES, input_size: tuple[int, int] = (416, 416),
        depth: float = 0.33, width: float = 0.25, rect: bool = False,
    ) -> None:
        super().__init__()
        if len(input_size) != 2 or any(side % STRIDES[-1] or not 0 < side <= MAX_INPUT_SIDE for side in input_size):
            raise ValueError(f"yolox input_size must be (height, width), multiples of 32 in 32..{MAX_INPUT_SIDE}; got "
                             f"{tuple(input_size)}")
        if not isinstance(rect, bool):  # bool("false") is True
            raise ValueError(f"yolox rect must be true or false; got {rect!r}")
        if num_classes < 2:
            raise ValueError(f"yolox num_classes counts the background and must be >= 2; got {num_classes}")
        self.num_classes = num_classes
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.rect = bool(rect)
        self.score_thresh = 0.01
        self.nms_thresh = 0.45
        self.detections_per_img = 100
        head_classes = 80 if num_classes == COCO_NUM_CLASSES else num_classes - 1
        self.backbone = PAFPN(depth, width)
        self.head = YOLOXHead(head_classes, width)
        labels = coco80_to_category_id() if num_classes == COCO_NUM_CLASSES else range(1, num_classes)
        self.register_buffer("label_of_class", torch.tensor(list(labels), dtype=torch.int64), persistent=False)

    # ------------------------------------------------------------------ the torchvision contract

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        """Eval: detections per image. Train (torchvision's convention): the loss dict for ``targets``."""
        if self.training:
            if targets is None:
                raise ValueError("yolox: training mode needs targets (boxes, labels per image)")
            from blinkflow.models.yolox_loss import yolox_loss

            return yolox_loss(self, images, targets)
        batch, ratios = self.letterbox(images)
        raw = self.raw(batch)
        size = tuple(batch.shape[-2:])
        return [
            self._detections(pred, ratio, image.shape[-2:], size) for pred, ratio, image in zip(raw, ratios, images)
        ]

    def letterbox_fit(self, height: int, width: int) -> tuple[float, tuple[int, int]]:
        """The resize ratio of a ``height`` x ``width`` image in the letterbox and the (height, width) it
        takes there (top-left; the rest is padding)."""
        ratio = min(self.input_size[0] / height, self.input_size[1] / width)
        return ratio, (max(1, int(height * ratio)), max(1, int(width * ratio)))  # int() truncates, as the YOLOX demo does

    def input_for(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) of the network's input for a ``height`` x ``width`` image: ``input_size``, or
        with ``rect`` the image's place in it padded to the stride."""
        if not self.rect:
            return self.input_size
        _, (fit_h, fit_w) = self.letterbox_fit(height, width)
        step = STRIDES[-1]
        return min(self.input_size[0], -(-fit_h // step) * step), min(self.input_size[1], -(-fit_w // step) * step)

    def letterbox(self, images: list[Tensor]) -> tuple[Tensor, list[float]]:
        """RGB [0, 1] images to the network's input: a BGR 0..255 NCHW batch and each image's resize ratio."""
        sizes = [self.input_for(*image.shape[-2:]) for image in images]
        height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
        dtype = images[0].dtype if images[0].is_floating_point() else torch.float32
        batch = images[0].new_full((len(images), 3, height, width), PAD_VALUE, dtype=dtype)
        ratios = []
        for slot, image in zip(batch, images):
            ratio, size = self.letterbox_fit(*image.shape[-2:])
            bgr = image.flip(0).to(dtype)[None] * 255.0
            slot[:, : size[0], : size[1]] = F.interpolate(bgr, size=size, mode="bilinear", align_corners=False)[0]
            ratios.append(ratio)
        return batch, ratios

    def raw(self, x: Tensor) -> Tensor:
        """The ONNX export's output on a letterboxed BGR 0..255 batch: (N, points, 5 + classes) of
        ``[x, y, w, h]`` on the stride grid (not decoded), sigmoid objectness, sigmoid class probabilities."""
        levels = [
            torch.cat([box, obj.sigmoid(), cls.sigmoid()], dim=1).flatten(2) for box, obj, cls in self.head_outputs(x)
        ]
        return torch.cat(levels, dim=2).permute(0, 2, 1)

    def head_outputs(self, x: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per stride 8/16/32 the head's (box, objectness logit, class logits) maps of a letterboxed BGR 0..255
        batch, for a training loss."""
        return self.head(self.backbone(x / PIXEL_SCALE))

    def decode(self, raw: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Boxes x1y1x2y2 in letterboxed input pixels for every point of ``raw`` (N, points, 4) of an input of
        ``size`` (height, width; default ``input_size``)."""
        grid, strides = self._grid(raw.shape[1], raw.device, raw.dtype, size or self.input_size)
        centre = (raw[..., :2] + grid) * strides
        half = torch.exp(raw[..., 2:4]) * strides / 2
        return torch.cat([centre - half, centre + half], dim=-1)

    # ------------------------------------------------------------------ helpers

    def _grid(self, points: int, device: torch.device, dtype: torch.dtype,
              size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Each point's (x, y) cell and its stride, level by level, row-major: the head's flattening order."""
        height, width = size
        cells, strides = [], []
        for stride in STRIDES:
            ys, xs = torch.meshgrid(
                torch.arange(height // stride, device=device), torch.arange(width // stride, device=device),
                indexing="ij",
            )
            cells.append(torch.stack([xs, ys], dim=-1).reshape(-1, 2))
            strides.append(torch.full((cells[-1].shape[0], 1), stride, device=device))
        grid, stride_of = torch.cat(cells).to(dtype), torch.cat(strides).to(dtype)
        if grid.shape[0] != points:
            raise ValueError(f"yolox: {points} head points do not match an input of {tuple(size)}")
        return grid, stride_of

    def _detections(self, pred: Tensor, ratio: float, image_size: torch.Size,
                    input_size: tuple[int, int]) -> dict[str, Tensor]:
        pred = pred.float()  # NMS wants one dtype; autocast may have made the head fp16
        boxes = self.decode(pred[None], input_size)[0]
        # YOLOX's post-processing: one class per point, the best, scored objectness x class probability
        scores, classes = (pred[:, 4:5] * pred[:, 5:]).max(dim=1)
        # a non-finite box (a NaN from the net) made NMS keep every box and reached the records as NaN
        keep = (scores >= self.score_thresh) & torch.isfinite(boxes).all(dim=1)
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        order = batched_nms(boxes, scores, classes, self.nms_thresh)[: self.detections_per_img]
        boxes = boxes[order] / ratio
        height, width = image_size
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        return {"boxes": boxes, "labels": self.label_of_class[classes[order]], "scores": scores[order]}
