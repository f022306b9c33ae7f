"""torchvision's standard SimCLR two-view transforms in a DataLoader: images per second.

The peer of ``input_pipeline.py``'s ``simclr`` part (Chen et al. 2020, "A Simple Framework for
Contrastive Learning of Visual Representations", Appendix A: RandomResizedCrop, flip, colour
jitter 0.8 strength with p=0.8, grayscale p=0.2, Gaussian blur p=0.5 with a kernel of 10% of
the image side). It runs in its own process: importing torch into a process that already
loaded TensorFlow crashes on this stack (segmentation fault in ``torch._dynamo``), and a fresh
process keeps each side's threads to itself. Prints the rate as JSON on the last line.
``--cpu_time 1`` instead times the transforms alone (no DataLoader) on one thread in process
CPU time, the peer of ``input_pipeline.py --parts stages``.

  python benchmarks/torchvision_simclr.py --folder DIR --batch 64 --steps 20 --blur 1
  python benchmarks/torchvision_simclr.py --folder DIR --blur 0 --cpu_time 1 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import time


def simclr_views(blur: bool):
  """torchvision's SimCLR view transform (one view)."""
  from torchvision import transforms  # pylint: disable=g-import-not-at-top
  ops = [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
         transforms.RandomApply([transforms.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
         transforms.RandomGrayscale(p=0.2)]
  if blur:  # kernel 10% of 224 px, odd
    ops.append(transforms.RandomApply([transforms.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5))
  ops.append(transforms.ToTensor())
  return transforms.Compose(ops)


def cpu_ms_per_image(folder: str, blur: bool, rounds: int) -> float:
  """CPU ms per image for two views (decode included), one thread, best of ``rounds``."""
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision import datasets  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  view = simclr_views(blur)
  ds = datasets.ImageFolder(folder, transform=lambda x: (view(x), view(x)))
  for i in range(min(8, len(ds))):
    ds[i]  # pylint: disable=pointless-statement
  best = float("inf")
  for _ in range(rounds):
    t0 = time.process_time()
    for i in range(len(ds)):
      ds[i]  # pylint: disable=pointless-statement
    best = min(best, time.process_time() - t0)
  return 1e3 * best / len(ds)


def torchvision_rate(folder: str, batch: int, steps: int, warmup: int, blur: bool,
                     workers: int) -> float:
  """Images/s of two SimCLR views per image from ``folder/<class>/*.jpg``."""
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision import datasets  # pylint: disable=g-import-not-at-top
  view = simclr_views(blur)

  class TwoViews:
    def __call__(self, x):
      return view(x), view(x)

  ds = datasets.ImageFolder(folder, transform=TwoViews())
  loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                       drop_last=True, persistent_workers=workers > 0)

  def batches():
    while True:
      yield from loader

  it = batches()
  for _ in range(warmup + 1):
    next(it)
  t0 = time.perf_counter()
  for _ in range(steps):
    next(it)
  return batch * steps / (time.perf_counter() - t0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--folder", required=True)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--blur", type=int, default=1)
  parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument("--cpu_time", type=int, default=0)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  if args.cpu_time:
    print(json.dumps({"cpu_ms_per_image": cpu_ms_per_image(args.folder, bool(args.blur),
                                                           args.rounds)}))
    return
  rate = torchvision_rate(args.folder, args.batch, args.steps, args.warmup, bool(args.blur),
                          args.workers)
  print(json.dumps({"images_per_s": rate}))


if __name__ == "__main__":
  main()
