"""CIRKD's loss classes (winycg/CIRKD, losses/) on segkd_kernels' ops: same constructor arguments,
defaults, parameter names (so state dicts load) and values. See docs/conventions.md for what each
computes and where the originals differ from our plain functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_positive, check_tensor
from ..ops.channel_wise_kd import channel_wise_kd
from ..ops.cross_image_kd import cross_image_kd
from ..ops.memory_contrast_kd import memory_contrast_kd
from ..ops.pairwise_kd import pairwise_kd
from ..ops.pixel_kd import pixel_kd


class CriterionKD(nn.Module):
    """Pixel KD: batchmean KL over the N*H*W pixel rows, times temperature^2 (CIRKD default 1)."""

    def __init__(self, temperature=1, *, backend="auto"):
        super().__init__()
        check_positive("temperature", temperature)
        self.temperature, self.backend = temperature, backend

    def forward(self, pred, soft):
        return pixel_kd(pred, soft, self.temperature, backend=self.backend)


class CriterionCWD(nn.Module):
    """CIRKD's CWD. The KL forms run fused: norm_type='channel' (softmax over H*W per channel, KL sum
    / (N * C_s) * T^2, C_s the student's channel count before the 1x1 conv, as CIRKD) and
    norm_type='spatial' (softmax over channels per pixel, / (N*H*W) * T^2). The conv maps the
    student's channels when they differ from the teacher's; it exists either way, as CIRKD's."""

    FUSED = (("channel", "kl"), ("spatial", "kl"))

    def __init__(self, s_channels, t_channels, norm_type="none", divergence="mse", temperature=1.0, *,
                 backend="auto"):
        super().__init__()
        if (norm_type, divergence) not in self.FUSED:
            raise ValueError(f"norm_type, divergence: ({norm_type!r}, {divergence!r}) has no fused form; "
                             f"expected one of {self.FUSED}")
        check_positive("temperature", temperature)
        self.norm_type, self.divergence, self.temperature, self.backend = norm_type, divergence, temperature, backend
        self.conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False)

    def forward(self, preds_S, preds_T):
        check_tensor("preds_S", preds_S, rank=4)
        c_s = preds_S.shape[1]
        if c_s != preds_T.shape[1]:
            preds_S = self.conv(preds_S)
        if self.norm_type == "spatial":
            return pixel_kd(preds_S, preds_T, self.temperature, backend=self.backend)
        # channel_wise_kd divides by N * C_t; CIRKD by N * C_s (taken before the conv)
        loss = channel_wise_kd(preds_S, preds_T, self.temperature, backend=self.backend)
        return loss * (preds_T.shape[1] / c_s) if c_s != preds_T.shape[1] else loss


class CriterionStructuralKD(nn.Module):
    """SKD pair-wise as CIRKD: 2x2 max pooling (ceil mode), unit pixels, mean over N*P*P of the squared
    similarity differences."""

    def __init__(self, *, backend="auto"):
        super().__init__()
        self.backend = backend

    def forward(self, feat_S, feat_T):
        return pairwise_kd(feat_S, feat_T, pool=2, backend=self.backend)


class CriterionMiniBatchCrossImagePair(nn.Module):
    """CIRKD's mini-batch cross-image loss, current version: 4x4 average pooling (ceil mode) first when
    H and W are both at least 256, then cross_image_kd (no temperature^2)."""

    def __init__(self, temperature, *, backend="auto"):
        super().__init__()
        check_positive("temperature", temperature)
        self.temperature, self.backend = temperature, backend

    def forward(self, feat_S, feat_T):
        check_tensor("feat_S", feat_S, rank=4)
        h, w = feat_S.shape[2:]
        if h >= 256 and w >= 256:
            feat_S = F.avg_pool2d(feat_S, 4, 4, ceil_mode=True)
            feat_T = F.avg_pool2d(feat_T, 4, 4, ceil_mode=True)
        return cross_image_kd(feat_S, feat_T, self.temperature, backend=self.backend)


class StudentSegContrast(nn.Module):
    """CIRKD's memory terms: returns (pixel-to-pixel, pixel-to-region) losses, each
    memory_contrast_kd of the student's projected anchor embeddings against a bank sampled from a
    queue of teacher embeddings. The constructor's sizes are per class, as CIRKD's (its training
    script passes `4096 // num_classes + 1` and `1024 // num_classes + 1` as the contrast sizes).

    Each forward, before the loss (as CIRKD): for every image and every non-ignored class in it, the
    normalised mean teacher embedding of the class goes into the region queue, and up to 16 teacher
    pixel embeddings into the pixel queue. `class_pixels=False` reproduces CIRKD's code, which takes
    those pixels among the first `count` pixels of the whole image (it indexes the image with the
    permutation of the class's pixel count); `True` takes them among the class's own pixels.
    Random draws use `generator` (default: torch's global generator, as CIRKD). Under
    torch.distributed the queue update gathers every rank's teacher embeddings, as CIRKD's. The
    projection head uses BatchNorm2d where CIRKD has SyncBatchNorm (same parameters; convert with
    nn.SyncBatchNorm.convert_sync_batchnorm for multi-GPU runs)."""

    pixel_update_freq = 16

    def __init__(self, num_classes, pixel_memory_size, region_memory_size, region_contrast_size,
                 pixel_contrast_size, contrast_kd_temperature, contrast_temperature, s_channels, t_channels,
                 ignore_label, *, class_pixels=False, generator=None, backend="auto"):
        super().__init__()
        check_positive("contrast_kd_temperature", contrast_kd_temperature)
        check_positive("contrast_temperature", contrast_temperature)
        self.contrast_kd_temperature = contrast_kd_temperature
        self.contrast_temperature = contrast_temperature
        self.dim, self.num_classes, self.ignore_label = t_channels, num_classes, ignore_label
        self.pixel_memory_size, self.region_memory_size = pixel_memory_size, region_memory_size
        self.pixel_contrast_size, self.region_contrast_size = pixel_contrast_size, region_contrast_size
        self.class_pixels, self.generator, self.backend = class_pixels, generator, backend
        self.project_head = nn.Sequential(
            nn.Conv2d(s_channels, t_channels, 1, bias=False), nn.BatchNorm2d(t_channels), nn.ReLU(True),
            nn.Conv2d(t_channels, t_channels, 1, bias=False))
        # queues start as random unit vectors, as CIRKD's (drawn from `generator` at build)
        self.register_buffer("teacher_segment_queue", F.normalize(
            torch.randn(num_classes, region_memory_size, t_channels, generator=generator), p=2, dim=2))
        self.register_buffer("segment_queue_ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("teacher_pixel_queue", F.normalize(
            torch.randn(num_classes, pixel_memory_size, t_channels, generator=generator), p=2, dim=2))
        self.register_buffer("pixel_queue_ptr", torch.zeros(num_classes, dtype=torch.long))

    def _randperm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.generator)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """keys: (N, C, h, w) unit teacher embeddings, labels: (N, h, w) at the same size."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            world = torch.distributed.get_world_size()
            parts = [torch.empty_like(keys) for _ in range(world)]
            torch.distributed.all_gather(parts, keys.contiguous())
            keys = torch.cat(parts)
            parts = [torch.empty_like(labels) for _ in range(world)]
            torch.distributed.all_gather(parts, labels.contiguous())
            labels = torch.cat(parts)
        n, c = keys.shape[:2]
        flat_keys = keys.reshape(n, c, -1)
        # the per-class bookkeeping is host-side (one transfer of the labels and pointers per step)
        flat_labels = labels.reshape(n, -1).cpu()
        seg_ptr = self.segment_queue_ptr.tolist()
        pix_ptr = self.pixel_queue_ptr.tolist()
        for b in range(n):
            feat, lab = flat_keys[b], flat_labels[b]
            for lb in torch.unique(lab).tolist():
                if lb == self.ignore_label:
                    continue
                idx = (lab == lb).nonzero()[:, 0]
                region = feat[:, idx.to(feat.device)].mean(dim=1)
                self.teacher_segment_queue[lb, seg_ptr[lb]] = F.normalize(region, p=2, dim=0)
                seg_ptr[lb] = (seg_ptr[lb] + 1) % self.region_memory_size
                count = idx.numel()
                perm = self._randperm(count)
                k = min(count, self.pixel_update_freq)
                chosen = idx[perm[:k]] if self.class_pixels else perm[:k]
                pixels = F.normalize(feat[:, chosen.to(feat.device)].T, p=2, dim=1)
                if pix_ptr[lb] + k >= self.pixel_memory_size:
                    self.teacher_pixel_queue[lb, -k:] = pixels
                    pix_ptr[lb] = 0
                else:
                    self.teacher_pixel_queue[lb, pix_ptr[lb]:pix_ptr[lb] + k] = pixels
                    pix_ptr[lb] = (pix_ptr[lb] + k) % self.pixel_memory_size
        self.segment_queue_ptr.copy_(torch.tensor(seg_ptr))
        self.pixel_queue_ptr.copy_(torch.tensor(pix_ptr))

    def _sample(self, queue: torch.Tensor, size: int) -> torch.Tensor:
        """The same `size` random slots of every class's queue, (num_classes * size, C), class-major."""
        index = self._randperm(queue.shape[1])[:size].to(queue.device)
        return queue[:, index].reshape(-1, queue.shape[2])

    def forward(self, s_feats, t_feats, labels=None, predict=None):
        """s_feats (N, C_s, h, w), t_feats (N, C_t, h, w) embeddings, labels (N, H, W) (resized to h, w
        by nearest). `predict` is unused, as in CIRKD."""
        check_tensor("s_feats", s_feats, rank=4)
        check_tensor("t_feats", t_feats, rank=4)
        if labels is None:
            raise ValueError("labels: the memory terms need the label map (N, H, W)")
        t_unit = F.normalize(t_feats.detach(), p=2, dim=1)
        s_proj = self.project_head(s_feats)
        labels = F.interpolate(labels[:, None].float(), size=s_proj.shape[2:], mode="nearest")[:, 0].long()
        self._dequeue_and_enqueue(t_unit, labels)
        valid = (labels != self.ignore_label).reshape(-1)
        c = s_proj.shape[1]
        s_rows = s_proj.permute(0, 2, 3, 1).reshape(-1, c)[valid]
        t_rows = t_unit.permute(0, 2, 3, 1).reshape(-1, t_unit.shape[1])[valid]
        if s_rows.shape[0] == 0:  # every pixel ignored: zero losses that keep the graph
            zero = 0.0 * (s_proj**2).mean()
            return zero, zero
        pixel_bank = self._sample(self.teacher_pixel_queue, self.pixel_contrast_size)
        region_bank = self._sample(self.teacher_segment_queue, self.region_contrast_size)
        args = dict(tau=self.contrast_temperature, kd_tau=self.contrast_kd_temperature, backend=self.backend)
        return (memory_contrast_kd(s_rows, t_rows, pixel_bank, **args),
                memory_contrast_kd(s_rows, t_rows, region_bank, **args))
