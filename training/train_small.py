"""Train the project's small model (``sparvar.small``): tokenizer, then transformer, in minutes.

    pip install ".[train]"
    python training/train_small.py --out sparvar/weights/small.safetensors      # one H200: ~7 min

Data: the colour and grey sample photographs scikit-image ships (offline), each its own
pseudo-class; every training image is a random square crop (40-100% of the photograph's shorter
side), resized to 256x256 and flipped at random. ``--export-sources FILE`` writes the photographs
to an ``.npz`` and ``--sources FILE`` reads them back, for a machine without scikit-image.

Steps, all seeded:
1. The tokenizer (``PatchTokenizer.fit``) on 256 crops: principal components of 4x4 patches and
   the quantiser's scale with the best reconstruction.
2. The transformer with teacher forcing (``InfinityNet.forward``): every scale's bits predicted
   from the scales before, cross-entropy over each bit, AdamW, bf16 autocast, a cosine learning
   rate over the time budget (``--minutes``: training stops when it is spent, so the run fits a
   session's device time), 10% of samples with the unconditional prompt (for guidance).
   Attention is FlexAttention with the block-causal mask, compiled (SDPA with a dense mask on a
   CPU).
3. The weights (``sparvar.small.save_small``) with how they were trained in the metadata.

GPU kernels do not run bit-for-bit alike from run to run, so a rerun gives a model of the same
quality, not the same bytes.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sparvar.infinity_net import InfinityNet, TextCondition, token_scales
from sparvar.models import get_model, resolve_schedule
from sparvar.small import PATCH, SMALL_CONFIG, SmallModel, save_small
from sparvar.tokenizer import PatchTokenizer

#: scikit-image's sample photographs, one pseudo-class each (grey ones repeated to 3 channels).
SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
           "colorwheel", "camera", "moon", "grass", "gravel", "brick", "coins", "clock")
SIZE = 256


def load_sources(path: str | None) -> tuple[list[torch.Tensor], list[str]]:
    """The photographs as ``[3, H, W]`` floats in [0, 1], and their names."""
    if path and not Path(path).is_file():
        sys.exit(f"train_small: --sources {path}: no such file")
    if path:
        data = np.load(path)
        names = [n for n in SOURCES if n in data]
        arrays = [data[n] for n in names]
    else:
        try:
            import skimage.data
        except ImportError:
            sys.exit("train_small: needs scikit-image (pip install '.[train]') or --sources FILE.npz")
        names, arrays = list(SOURCES), [getattr(skimage.data, n)() for n in SOURCES]
    images = []
    for a in arrays:
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
        images.append(torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float() / 255)
    return images, names


def crops(images: list[torch.Tensor], n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random training crops ``[n, 3, 256, 256]`` and their class labels."""
    labels = torch.randint(0, len(images), (n,), generator=g)
    out = []
    for c in labels.tolist():
        im = images[c]
        H, W = im.shape[1:]
        side = int(min(H, W) * (0.4 + 0.6 * torch.rand(1, generator=g).item()))
        y = int(torch.randint(0, H - side + 1, (1,), generator=g))
        x = int(torch.randint(0, W - side + 1, (1,), generator=g))
        crop = F.interpolate(im[None, :, y:y + side, x:x + side], size=(SIZE, SIZE), mode="bilinear",
                             antialias=True, align_corners=False)[0]
        out.append(crop.flip(-1) if torch.rand(1, generator=g).item() < 0.5 else crop)
    return torch.stack(out).clamp(0, 1), labels


def init_for_training(net: InfinityNet, seed: int) -> None:
    """Small normal weights (std 0.02), zero biases, the residual projections scaled by
    ``1/sqrt(2 depth)`` and a zero head (every bit starts at p = 1/2), as GPT-style models start."""
    g = torch.Generator().manual_seed(seed)
    for name, p in net.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.zeros_(p)
        elif p.dim() == 2 and "embed" not in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    for block in net.blocks:
        for lin in (block.sa.proj, block.ca.proj, block.ffn.fc2):
            lin.weight.data.mul_(1 / math.sqrt(2 * len(net.blocks)))
    net.head.weight.data.zero_()


def make_attend(levels: torch.Tensor, device: torch.device):
    """Block-causal attention over the whole schedule (``levels``: ``token_scales``):
    FlexAttention (compiled) on a GPU."""
    if device.type != "cuda":
        return None  # InfinityNet.forward's SDPA with the dense mask
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def causal(b, h, q_idx, kv_idx):
        return levels[q_idx] >= levels[kv_idx]

    L = levels.numel()
    mask = create_block_mask(causal, None, None, L, L, device=device)
    flex = torch.compile(flex_attention, dynamic=False)

    def attend(q, k, v, scale):
        dtype = torch.bfloat16
        return flex(q.to(dtype), k.to(dtype), v.to(dtype), block_mask=mask, scale=scale)
    return attend


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="sparvar/weights/small.safetensors")
    ap.add_argument("--minutes", type=float, default=6.0, help="training time budget (default 6)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sources", help=".npz of the photographs (instead of scikit-image)")
    ap.add_argument("--export-sources", metavar="FILE", help="write the photographs to FILE.npz and stop")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: the time budget)")
    ap.add_argument("--fit-images", type=int, default=256, help="crops the tokenizer is fitted on (default 256)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer width-128 stand-in, for a CPU smoke run")
    args = ap.parse_args(argv)

    images, names = load_sources(args.sources)
    if args.export_sources:
        np.savez_compressed(args.export_sources, **{n: (im.permute(1, 2, 0) * 255).round().byte().numpy()
                                                    for n, im in zip(names, images)})
        print(f"wrote {len(names)} photographs to {args.export_sources}")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    images = [im.to(device) for im in images]  # cropping and resizing on the GPU keep up with training
    g = torch.Generator().manual_seed(args.seed)
    schedule = resolve_schedule(get_model("small"), SIZE, SIZE)
    grids = schedule.grids

    t0 = time.perf_counter()
    fit_images, _ = crops(images, args.fit_images, g)
    tokenizer, tried = PatchTokenizer.fit(fit_images, PATCH, SMALL_CONFIG.codebook_dim, grids)
    print(f"tokenizer: reconstruction PSNR by scale {({k: round(v, 2) for k, v in tried.items()})} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)

    cfg = SMALL_CONFIG
    if args.tiny:
        from dataclasses import replace

        cfg = replace(cfg, depth=2, embed_dim=128, num_heads=1, block_chunks=2)
    net = InfinityNet(cfg)
    init_for_training(net, args.seed)
    net.set_schedule(grids, grids[-1])
    net = net.to(device).train()
    net.rope = net.rope.to(device)
    classes = torch.randn(len(images), cfg.text_maxlen, cfg.text_channels, generator=g)
    attend = make_attend(token_scales(grids, device), device)
    decay = [p for n, p in net.named_parameters() if p.dim() == 2 and "embed" not in n]
    rest = [p for n, p in net.named_parameters() if not (p.dim() == 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    n_params = sum(p.numel() for p in net.parameters())
    print(f"network: {n_params / 1e6:.1f}M parameters, {schedule.offsets[-1]} tokens per image, batch {args.batch}, "
          f"{args.minutes} min on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}", flush=True)

    budget, warmup = args.minutes * 60, 50
    start, step, log = time.perf_counter(), 0, []
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= budget or (args.max_steps and step >= args.max_steps):
            break
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget)))
        for group in opt.param_groups:
            group["lr"] = lr
        x, labels = crops(images, args.batch, g)
        with torch.no_grad():
            bits = tokenizer.encode(x, grids)
        uncond = torch.rand(args.batch, generator=g) < 0.1
        feats = [net.cfg_uncond if u else classes[c].to(device) for c, u in zip(labels.tolist(), uncond.tolist())]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = net(TextCondition.from_features(feats), bits, attend)
        target = torch.cat(bits, dim=1).long()
        logits = logits.float().view(*target.shape, 2)
        loss = F.cross_entropy(logits.reshape(-1, 2), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0 or step == 1:
            with torch.no_grad():
                acc = (logits.argmax(-1) == target).float().mean().item()
                last = (logits[:, -grids[-1][0] * grids[-1][1]:].argmax(-1) == target[:, -4096:]).float().mean().item()
            log.append({"step": step, "s": round(time.perf_counter() - start, 1), "loss": round(loss.item(), 4),
                        "bit_acc": round(acc, 4), "bit_acc_last_scale": round(last, 4), "lr": lr})
            print(log[-1], flush=True)
    train_s = time.perf_counter() - start
    meta = {"classes": names, "training": {
        "script": "training/train_small.py", "seed": args.seed, "steps": step, "batch": args.batch,
        "images_seen": step * args.batch, "minutes": round(train_s / 60, 2), "lr": args.lr,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "tokenizer_psnr_db": {str(k): round(v, 2) for k, v in tried.items()}, "log": log[-8:]}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_small(out, SmallModel(net.float().cpu(), tokenizer.cpu(), classes, meta))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) after {step} steps in {train_s / 60:.1f} min")


if __name__ == "__main__":
    main()
