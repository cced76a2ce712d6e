"""Box detection: one box per image with objectness (FMC_UIA), or several boxes with an anchor-free dense head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, generalized_box_iou_loss, sigmoid_focal_loss

from usagg.model.backbone import BackboneFeatures
from usagg.model.heads.base import (
    MapFusion,
    PooledMLP,
    TaskHead,
    conv_norm_act,
    pixel_centres,
    require_target,
)

# Loss weights of the box terms, as in DETR (Carion et al., ECCV 2020): 5 x L1 + 2 x generalised IoU.
L1_WEIGHT = 5.0
GIOU_WEIGHT = 2.0
BOX_SCALE_STRIDES = 4.0  # initial half-size of a predicted box, in feature-grid strides (softplus(0) ~ 0.69)
DENSE_PRE_NMS = 1000
DENSE_NMS_IOU = 0.6


def _box_targets(target: dict[str, torch.Tensor], kind: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return padded boxes ``[B, N, 4]``, their validity ``[B, N]`` and labels ``[B, N]``."""
    boxes = require_target(target, "boxes", kind).to(device).float()
    if boxes.dim() == 2:  # one box per image given as [B, 4]
        boxes = boxes.unsqueeze(1)
    valid = target.get("boxes_valid")
    valid = torch.ones(boxes.shape[:2], dtype=torch.bool, device=device) if valid is None else valid.to(device).bool()
    valid = valid & torch.isfinite(boxes).all(dim=-1) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    labels = target.get("box_labels")
    labels = torch.zeros(boxes.shape[:2], dtype=torch.long, device=device) if labels is None else labels.to(device).long()
    if labels.dim() == 1:
        labels = labels.unsqueeze(1)
    return boxes, valid, labels


def _ltrb_to_boxes(centres_x: torch.Tensor, centres_y: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
    """Convert per-location distances ``[B, 4, h, w]`` (left, top, right, bottom) into xyxy boxes ``[B, h*w, 4]``."""
    cx = centres_x.view(1, 1, -1)
    cy = centres_y.view(1, -1, 1)
    boxes = torch.stack([cx - ltrb[:, 0], cy - ltrb[:, 1], cx + ltrb[:, 2], cy + ltrb[:, 3]], dim=-1)
    return boxes.flatten(1, 2)


def _centerness_target(centres: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Return FCOS centre-ness, ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))``, of each location in its box."""
    left_right = torch.stack([centres[:, 0] - boxes[:, 0], boxes[:, 2] - centres[:, 0]], dim=1).clamp_min(0)
    top_bottom = torch.stack([centres[:, 1] - boxes[:, 1], boxes[:, 3] - centres[:, 1]], dim=1).clamp_min(0)
    horizontal = left_right.min(dim=1).values / left_right.max(dim=1).values.clamp_min(1e-6)
    vertical = top_bottom.min(dim=1).values / top_bottom.max(dim=1).values.clamp_min(1e-6)
    return torch.sqrt(horizontal * vertical)


class SingleBoxHead(TaskHead):
    """One box per image plus an objectness score and, with several classes, class logits.

    Every token location proposes a box (its centre plus predicted left/top/right/bottom distances) and a
    score. The image's box is the softmax-weighted average of the proposals, so the box stays differentiable
    and translation-equivariant. Objectness and class come from the pooled features. Loss:
    ``5 * L1 + 2 * GIoU`` on images with a box (L1 in units of the image size), binary cross-entropy on
    objectness for every image and cross-entropy on the class. With several target boxes, the first valid one is used.
    """

    kind = "detection"

    def __init__(self, embed_dim: int, num_maps: int, num_classes: int, channels: int):
        super().__init__()
        self.num_classes = num_classes
        self.fuse = MapFusion(embed_dim, num_maps, channels)
        self.tower = nn.Sequential(conv_norm_act(channels, channels), conv_norm_act(channels, channels))
        self.centre = nn.Conv2d(channels, 1, 3, padding=1)
        self.ltrb = nn.Conv2d(channels, 4, 3, padding=1)
        self.objectness = nn.Linear(2 * embed_dim, 1)
        self.classifier = PooledMLP(embed_dim, channels, num_classes) if num_classes > 1 else None
        nn.init.zeros_(self.ltrb.weight)
        nn.init.zeros_(self.ltrb.bias)

    def forward(self, features: BackboneFeatures) -> dict[str, torch.Tensor]:
        x = self.tower(self.fuse(features.maps))
        height, width = x.shape[-2:]
        stride_y, stride_x = features.image_hw[0] / height, features.image_hw[1] / width
        strides = torch.tensor([stride_x, stride_y, stride_x, stride_y], device=x.device).view(1, 4, 1, 1)
        ltrb = F.softplus(self.ltrb(x).float()) * BOX_SCALE_STRIDES * strides
        proposals = _ltrb_to_boxes(pixel_centres(width, stride_x, x.device), pixel_centres(height, stride_y, x.device), ltrb)
        weights = self.centre(x).float().flatten(1).softmax(dim=-1)
        box = (weights.unsqueeze(-1) * proposals).sum(dim=1)
        image_h, image_w = features.image_hw
        limits = box.new_tensor([image_w, image_h, image_w, image_h])
        box = torch.minimum(box.clamp_min(0), limits)
        pooled = features.pooled()
        outputs = {
            "boxes": box.unsqueeze(1),
            "objectness": self.objectness(pooled).float(),
            "image_size": box.new_tensor([image_w, image_h]),
        }
        if self.classifier is not None:
            outputs["class_logits"] = self.classifier(pooled).float().unsqueeze(1)
        return outputs

    def loss(self, outputs, target, label_smoothing: float = 0.0):
        predicted = outputs["boxes"][:, 0]
        boxes, valid, labels = _box_targets(target, self.kind, predicted.device)
        has_box = valid.any(dim=1)
        first = valid.float().argmax(dim=1)  # index of the first valid box (0 when there is none)
        rows = torch.arange(boxes.shape[0], device=boxes.device)
        gt = boxes[rows, first]
        gt_label = labels[rows, first]

        objectness = F.binary_cross_entropy_with_logits(outputs["objectness"][:, 0], has_box.float())
        parts = {"objectness": float(objectness.detach())}
        total = objectness
        if bool(has_box.any()):
            scale = outputs["image_size"].repeat(2)
            l1 = ((predicted[has_box] - gt[has_box]).abs() / scale).mean()
            giou = generalized_box_iou_loss(predicted[has_box], gt[has_box], reduction="mean")
            total = total + L1_WEIGHT * l1 + GIOU_WEIGHT * giou
            parts.update(l1=float(l1.detach()), giou=float(giou.detach()))
            if "class_logits" in outputs:
                ce = F.cross_entropy(outputs["class_logits"][has_box, 0], gt_label[has_box], label_smoothing=label_smoothing)
                total = total + ce
                parts["class_ce"] = float(ce.detach())
        return total, parts

    @torch.no_grad()
    def predict(self, outputs):
        boxes = outputs["boxes"].float()
        scores = torch.sigmoid(outputs["objectness"].float())
        if "class_logits" in outputs:
            class_probs = outputs["class_logits"].softmax(dim=-1)
            class_scores, labels = class_probs.max(dim=-1)
            scores = scores * class_scores
        else:
            labels = torch.zeros(scores.shape, dtype=torch.long, device=scores.device)
        return {"boxes": boxes, "scores": scores, "labels": labels}


class DenseBoxHead(TaskHead):
    """Several boxes per image with an anchor-free, centre-ness head in the style of FCOS (Tian et al., ICCV 2019).

    Runs on one level at stride 8 (the token grid upsampled twice). A location is positive for the
    smallest target box that contains its centre; a box containing no centre gets the location nearest
    its centre. Loss: sigmoid focal loss on classes (normalised by positives), generalised IoU on the
    positives' boxes weighted by their centre-ness target, and binary cross-entropy on centre-ness.
    Prediction keeps the ``max_boxes`` best boxes after class-wise non-maximum suppression.
    """

    kind = "detection"

    def __init__(self, embed_dim: int, num_maps: int, num_classes: int, channels: int, max_boxes: int):
        super().__init__()
        self.num_classes = num_classes
        self.max_boxes = max_boxes
        self.fuse = MapFusion(embed_dim, num_maps, channels)
        self.up = conv_norm_act(channels, channels)
        self.tower = nn.Sequential(conv_norm_act(channels, channels), conv_norm_act(channels, channels))
        self.cls = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.ltrb = nn.Conv2d(channels, 4, 3, padding=1)
        self.centerness = nn.Conv2d(channels, 1, 3, padding=1)
        nn.init.constant_(self.cls.bias, -4.6)  # prior probability 0.01 for the focal loss (Lin et al., 2017)

    def forward(self, features: BackboneFeatures) -> dict[str, torch.Tensor]:
        x = self.fuse(features.maps)
        x = self.up(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        x = self.tower(x)
        height, width = x.shape[-2:]
        stride_y, stride_x = features.image_hw[0] / height, features.image_hw[1] / width
        strides = torch.tensor([stride_x, stride_y, stride_x, stride_y], device=x.device).view(1, 4, 1, 1)
        ltrb = F.softplus(self.ltrb(x).float()) * BOX_SCALE_STRIDES * strides
        centres_x = pixel_centres(width, stride_x, x.device)
        centres_y = pixel_centres(height, stride_y, x.device)
        image_h, image_w = features.image_hw
        return {
            "class_logits": self.cls(x).float().flatten(2).transpose(1, 2),  # [B, L, C]
            "centerness": self.centerness(x).float().flatten(1),  # [B, L]
            "boxes": _ltrb_to_boxes(centres_x, centres_y, ltrb),  # [B, L, 4]
            "centres": torch.stack(torch.meshgrid(centres_y, centres_x, indexing="ij")[::-1], dim=-1).view(-1, 2),
            "image_size": ltrb.new_tensor([image_w, image_h]),
        }

    def _assign(self, centres: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Return, per location, the index of its target box in ``boxes`` (``-1`` for background)."""
        boxes = boxes[valid]
        index_map = torch.nonzero(valid).squeeze(1)
        assigned = torch.full((centres.shape[0],), -1, dtype=torch.long, device=centres.device)
        if boxes.shape[0] == 0:
            return assigned
        cx, cy = centres[:, 0:1], centres[:, 1:2]
        inside_LN = (cx > boxes[:, 0]) & (cx < boxes[:, 2]) & (cy > boxes[:, 1]) & (cy < boxes[:, 3])
        area_N = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        masked_area = torch.where(inside_LN, area_N.expand_as(inside_LN), torch.full_like(inside_LN, float("inf"), dtype=area_N.dtype))
        best_area, best = masked_area.min(dim=1)
        assigned = torch.where(torch.isfinite(best_area), index_map[best], assigned)
        box_centres = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], dim=1)
        for n in range(boxes.shape[0]):
            if not bool(inside_LN[:, n].any()):
                nearest = torch.argmin((centres - box_centres[n]).square().sum(dim=1))
                assigned[nearest] = index_map[n]
        return assigned

    def loss(self, outputs, target, label_smoothing: float = 0.0):
        logits = outputs["class_logits"]
        boxes, valid, labels = _box_targets(target, self.kind, logits.device)
        cls_target, predicted, matched, centres, centerness = self._match(outputs, boxes, valid, labels)

        num_positive = max(1, predicted.shape[0])
        focal = sigmoid_focal_loss(logits, cls_target, reduction="sum") / num_positive
        parts = {"focal": float(focal.detach())}
        if predicted.shape[0] == 0:
            return focal, parts

        ctr_target = _centerness_target(centres, matched)
        giou_each = generalized_box_iou_loss(predicted, matched, reduction="none")
        giou = (giou_each * ctr_target).sum() / ctr_target.sum().clamp_min(1e-6)
        ctr = F.binary_cross_entropy_with_logits(centerness, ctr_target)
        parts.update(giou=float(giou.detach()), centerness=float(ctr.detach()))
        return focal + GIOU_WEIGHT * giou + ctr, parts

    def _match(self, outputs, boxes, valid, labels):
        """Return the one-hot class targets ``[B, L, C]`` and, for all positive locations of the batch, the
        predicted boxes, matched target boxes, location centres and centre-ness logits."""
        logits = outputs["class_logits"]
        centres = outputs["centres"]
        cls_target = torch.zeros_like(logits)
        predicted, matched, positive_centres, centerness = [], [], [], []
        for b in range(logits.shape[0]):
            assigned = self._assign(centres, boxes[b], valid[b])
            positive = assigned >= 0
            cls_target[b, positive, labels[b][assigned[positive]]] = 1.0
            predicted.append(outputs["boxes"][b, positive])
            matched.append(boxes[b][assigned[positive]])
            positive_centres.append(centres[positive])
            centerness.append(outputs["centerness"][b, positive])
        return cls_target, torch.cat(predicted), torch.cat(matched), torch.cat(positive_centres), torch.cat(centerness)

    @torch.no_grad()
    def predict(self, outputs):
        scores_BLC = torch.sqrt(torch.sigmoid(outputs["class_logits"]) * torch.sigmoid(outputs["centerness"]).unsqueeze(-1))
        boxes_BL4 = outputs["boxes"]
        image_w, image_h = outputs["image_size"].tolist()
        batch = scores_BLC.shape[0]
        out_boxes = boxes_BL4.new_zeros(batch, self.max_boxes, 4)
        out_scores = scores_BLC.new_zeros(batch, self.max_boxes)
        out_labels = torch.zeros(batch, self.max_boxes, dtype=torch.long, device=scores_BLC.device)
        for b in range(batch):
            flat = scores_BLC[b].flatten()
            top_scores, top_index = flat.topk(min(DENSE_PRE_NMS, flat.numel()))
            locations = top_index // self.num_classes
            labels = top_index % self.num_classes
            boxes = boxes_BL4[b, locations].clone()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image_w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image_h)
            keep = batched_nms(boxes, top_scores, labels, DENSE_NMS_IOU)[: self.max_boxes]
            count = keep.numel()
            out_boxes[b, :count] = boxes[keep]
            out_scores[b, :count] = top_scores[keep]
            out_labels[b, :count] = labels[keep]
        return {"boxes": out_boxes, "scores": out_scores, "labels": out_labels}
