"""The same DenseDINO training step in PyTorch eager, for `trainer bench` to be compared against.

Written as the official DenseDINO code (`vision_transformer.py`, `main_dino.py`) runs it: ViT with the full
[CLS, REF, PATCH] sequence and the additive `all2pos_pos2cls_eye` mask, reference tokens by
`F.grid_sample(bicubic)`, two DINO heads with weight-normalised last layers, DenseDINO's loss, AdamW,
per-tensor clipping, the EMA teacher. fp32 by default; `--amp bf16` runs forward and loss under
`torch.autocast(dtype=torch.bfloat16)`, and `--amp fp16` as the official `main_dino.py` does with
`--use_fp16` (autocast fp16, a GradScaler, gradients unscaled before the clip).

    ~/.cache/densedino/torch-venv/bin/python bench/pytorch_step.py --arch vit_tiny --batch 8 --views 4 \
        --size 224 --points 4 --steps 5 [--device cuda] [--threads 2] [--amp bf16|fp16] [--count-ops]

Prints one line: `pytorch ...: ... s/step, ... images/s`; with `--count-ops`, also the ATen ops of one
step (and the CUDA kernels on a GPU) counted by torch.profiler, and where its time goes.
"""

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCH = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}


class Block(nn.Module):
    def __init__(self, d, heads, drop):
        super().__init__()
        self.heads, self.drop = heads, drop
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def drop_path(self, x):
        if self.drop == 0.0 or not self.training:
            return x
        keep = 1 - self.drop
        mask = (keep + torch.rand(x.shape[0], 1, 1, device=x.device)).floor_()
        return x.div(keep) * mask

    def forward(self, x, mask):
        b, t, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = (qkv[0] @ qkv[1].transpose(-2, -1)) * (c // self.heads) ** -0.5 + mask
        o = (a.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(b, t, c)
        x = x + self.drop_path(self.proj(o))
        return x + self.drop_path(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class ViT(nn.Module):
    def __init__(self, d, heads, size, drop):
        super().__init__()
        self.grid = size // 16
        self.patch = nn.Conv2d(3, d, 16, 16)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 1 + self.grid**2, d) * 0.02)
        self.blocks = nn.ModuleList([Block(d, heads, drop * i / 11) for i in range(12)])
        self.norm = nn.LayerNorm(d, eps=1e-6)

    def forward(self, x, points):
        b = x.shape[0]
        d = self.pos.shape[-1]
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos[:, 1:]
        cls = (self.cls + self.pos[:, :1]).expand(b, -1, -1)
        grid = self.pos[:, 1:].reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2).expand(b, -1, -1, -1)
        refs = F.grid_sample(grid, points.unsqueeze(1), mode="bicubic", align_corners=False).squeeze(2).transpose(1, 2)
        r, n = refs.shape[1], tokens.shape[1]
        seq = torch.cat([cls, refs, tokens], 1)
        mask = torch.zeros(1 + r + n, 1 + r + n, device=x.device)
        mask[:, 1 : 1 + r] = float("-inf")
        mask[1 : 1 + r, 0] = float("-inf")
        mask.fill_diagonal_(0.0)
        for blk in self.blocks:
            seq = blk(seq, mask)
        seq = self.norm(seq)
        return seq[:, 0], seq[:, 1 : 1 + r]


class Head(nn.Module):
    def __init__(self, d, k):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(), nn.Linear(2048, 256))
        self.last = nn.utils.weight_norm(nn.Linear(256, k, bias=False))
        self.last.weight_g.data.fill_(1)
        self.last.weight_g.requires_grad = False

    def forward(self, x):
        return self.last(F.normalize(self.mlp(x), dim=-1))


class Side(nn.Module):
    def __init__(self, d, heads, size, k, drop):
        super().__init__()
        self.backbone = ViT(d, heads, size, drop)
        self.head, self.ref_head = Head(d, k), Head(d, k)

    def forward(self, views, points):
        c, r = self.backbone(torch.cat(views), torch.cat(points))
        return self.head(c), self.ref_head(r.reshape(-1, r.shape[-1]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vit_tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--points", type=int, default=4)
    ap.add_argument("--out-dim", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    ap.add_argument("--count-ops", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    d, heads = ARCH[a.arch]
    b, v, m, k = a.batch, a.views, a.points, a.out_dim
    student = Side(d, heads, a.size, k, 0.1).to(dev)
    teacher = Side(d, heads, a.size, k, 0.0).to(dev)  # weight_norm modules cannot be deep-copied
    teacher.load_state_dict(student.state_dict())
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad = False
    for blk in teacher.backbone.blocks:
        blk.drop = 0.0
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for n, p in student.named_parameters() if p.requires_grad and p.ndim > 1 and not n.endswith(".bias")]
    rest = [p for n, p in student.named_parameters() if p.requires_grad and not (p.ndim > 1 and not n.endswith(".bias"))]
    opt = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=1e-4, weight_decay=0.04)
    center = torch.zeros(1, k, device=dev)
    ref_center = torch.zeros(1, k, device=dev)
    views = [torch.randn(b, 3, a.size, a.size, device=dev) for _ in range(v)]
    t_pts = [torch.rand(b, v * m, 2, device=dev) * 2 - 1 for _ in range(2)]
    s_pts = [torch.rand(b, 2 * m, 2, device=dev) * 2 - 1 for _ in range(v)]

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.amp)
    scaler = torch.amp.GradScaler(dev.type) if a.amp == "fp16" else None

    def step():
        nonlocal center, ref_center
        with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            with torch.no_grad():
                t_cls, t_ref = teacher(views[:2], t_pts)
            s_cls, s_ref = student(views, s_pts)
            loss = dino_loss(t_cls, t_ref, s_cls, s_ref)
        opt.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)  # the clip sees the true gradients, as main_dino.py
        else:
            loss.backward()
        for p in params:
            norm = p.grad.data.norm(2)
            p.grad.data.mul_(torch.clamp(3.0 / (norm + 1e-6), max=1.0))
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        with torch.no_grad():
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.data.mul_(0.996).add_((1 - 0.996) * ps.detach().data)
            t_cls, t_ref = t_cls.float(), t_ref.float()
            center = center * 0.9 + t_cls.mean(0, keepdim=True) * 0.1
            ref_center = ref_center * 0.9 + t_ref.reshape(2, b, v, m, k)[:, :, :2].reshape(-1, k).mean(0, keepdim=True) * 0.1
        return loss.item()

    def dino_loss(t_cls, t_ref, s_cls, s_ref):
        t_cls, t_ref, s_cls, s_ref = t_cls.float(), t_ref.float(), s_cls.float(), s_ref.float()
        t = F.softmax((t_cls - center) / 0.04, -1).chunk(2)
        s = (s_cls / 0.1).chunk(v)
        cls_loss = sum(torch.sum(-t[g] * F.log_softmax(s[w], -1), -1).mean() for g in range(2) for w in range(2) if w != g) / (2 + 1e-5)
        tr = F.softmax((t_ref - ref_center) / 0.04, -1).reshape(2, b, v, m, k)
        sr = (s_ref / 0.1).reshape(v, b, 2, m, k)
        terms = [torch.sum(-tr[g][:, w] * F.log_softmax(sr[w][:, g], -1), -1).mean() for g in range(2) for w in range(v) if w != g]
        return 0.5 * cls_loss + 0.5 * sum(terms) / (len(terms) + 1e-5)

    for _ in range(a.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    secs = (time.perf_counter() - t0) / a.steps
    precision = {"none": "f32", "bf16": "AMP bf16", "fp16": "AMP fp16 + GradScaler"}[a.amp]
    print(f"pytorch {torch.__version__} on {a.device} ({torch.get_num_threads()} threads), {precision}: {a.arch} {v} views x {a.size} "
          f"M={m} batch {b} K={k}: {secs:.4f} s/step, {b / secs:.1f} images/s")
    if a.count_ops:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step()
        events = prof.events()
        aten = sum(1 for e in events if e.name.startswith("aten::"))
        kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"pytorch ops per step: {aten} ATen ops" + (f", {kernels} CUDA kernels" if dev.type == "cuda" else ""))
        sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=15))


if __name__ == "__main__":
    main()
