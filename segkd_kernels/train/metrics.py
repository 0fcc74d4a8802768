"""Segmentation metrics from a confusion matrix (exact under DDP: ranks sum their matrices)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ConfusionMatrix:
    """K x K counts, rows = ground truth, columns = prediction; ignored pixels are skipped."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device="cpu"):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        valid = label != self.ignore_index
        k = self.num_classes
        idx = label[valid].to(torch.int64) * k + pred[valid].to(torch.int64)
        self.mat += torch.bincount(idx, minlength=k * k).reshape(k, k).to(self.mat.device)

    def all_reduce(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat)

    def compute(self, class_names: list[str] | None = None) -> dict:
        """mIoU over the classes present in ground truth or prediction, per-class IoU, pixel accuracy."""
        m = self.mat.double().cpu()
        tp = m.diag()
        gt, pr = m.sum(1), m.sum(0)
        union = gt + pr - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        present = union > 0
        miou = iou[present].mean().item() if present.any() else float("nan")
        total = m.sum().item()
        names = class_names or [str(i) for i in range(self.num_classes)]
        return {
            "miou": 100.0 * miou,
            "pixel_acc": 100.0 * tp.sum().item() / total if total else float("nan"),
            "per_class_iou": {names[i]: (100.0 * iou[i].item() if present[i] else None)
                              for i in range(self.num_classes)},
            "pixels": int(total),
        }


def upsample_logits(logits: torch.Tensor, size) -> torch.Tensor:
    if logits.shape[-2:] == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_whole(model, x: torch.Tensor) -> torch.Tensor:
    """(N, K, H, W) logits for the whole input, upsampled to its size."""
    return upsample_logits(model(x)["logits"].float(), x.shape[-2:])


@torch.no_grad()
def predict_slide(model, x: torch.Tensor, window, stride, num_classes: int) -> torch.Tensor:
    """Sliding-window inference: windows of `window` (int or (h, w)) pixels every `stride`, the logits
    averaged where windows overlap; inputs smaller than the window are padded (the padding cropped off)."""
    wh, ww = (window, window) if isinstance(window, int) else tuple(window)
    sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
    n, _, h, w = x.shape
    device = x.device
    ph, pw = max(wh - h, 0), max(ww - w, 0)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    H, W = x.shape[-2:]
    out = torch.zeros(n, num_classes, H, W, device=device)
    count = torch.zeros(1, 1, H, W, device=device)

    def starts(size, win, step):
        s = list(range(0, size - win + 1, step))
        if s[-1] + win < size:
            s.append(size - win)
        return s

    for y0 in starts(H, wh, sh):
        for x0 in starts(W, ww, sw):
            crop = x[..., y0:y0 + wh, x0:x0 + ww]
            out[..., y0:y0 + wh, x0:x0 + ww] += upsample_logits(model(crop)["logits"].float(), crop.shape[-2:])
            count[..., y0:y0 + wh, x0:x0 + ww] += 1
    return (out / count)[..., :h, :w]
