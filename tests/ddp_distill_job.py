"""Run by tests/test_finetune.py under torchrun (2 processes, gloo, CPU): distill with DDP."""

import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import dsrewrite


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same teacher on every rank
    teacher = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(32, 32, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = dsrewrite.convert(teacher, (2, 3, 8, 8), "aggressive", ["replace.min_in_channels=0"]).model
    data = TensorDataset(torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
                         torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(2)))
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=8, sampler=sampler)
    history = dsrewrite.distill(student, teacher, loader, epochs=2, lr=1e-2, eval_loader=loader, device="cpu")
    digest = float(sum(p.double().sum() for p in student.parameters()))
    result = {"rank": rank, "world": dist.get_world_size(), "digest": digest,
              "history": [h.__dict__ for h in history],
              "teacher_unchanged": all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())}
    with open(f"{out_dir}/rank{rank}.json", "w") as fh:
        json.dump(result, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
