"""The blog's own training pipeline, as the blog wrote it: the reference that bench/train_speed.py times.

torchvision ImageFolder (or CIFAR10) -> per-sample ToTensor + Normalize -> DataLoader(batch 32, shuffle) ->
the 3-conv CNN -> Adam 1e-3, cross-entropy, 4 epochs, fp32. Prints one JSON line with seconds per epoch
and test accuracy (and writes it to --result). Self-contained on purpose: it must not borrow any of cifarkit's
speed-ups.

    python bench/blog_train.py --data $CIFARKIT_DATA --epochs 4
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as transforms


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(64 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = self.pool(F.relu(self.conv3(x)))
        x = x.view(-1, 64 * 4 * 4)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and test/, or a torchvision root")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (the PyTorch tutorial's 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result", default=None, help="also write the JSON line to this file")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    if os.path.isdir(os.path.join(args.data, "train")):
        trainset = torchvision.datasets.ImageFolder(os.path.join(args.data, "train"), transform=transform)
        testset = torchvision.datasets.ImageFolder(os.path.join(args.data, "test"), transform=transform)
    else:
        trainset = torchvision.datasets.CIFAR10(args.data, train=True, download=False, transform=transform)
        testset = torchvision.datasets.CIFAR10(args.data, train=False, download=False, transform=transform)
    trainloader = torch.utils.data.DataLoader(trainset, batch_size=32, shuffle=True, num_workers=args.workers)
    testloader = torch.utils.data.DataLoader(testset, batch_size=32, shuffle=False, num_workers=args.workers)

    net = Net()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.001)
    epoch_seconds = []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        running_loss = 0.0
        for i, (inputs, labels) in enumerate(trainloader):
            optimizer.zero_grad()
            loss = criterion(net(inputs), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            if i % 500 == 499:
                print(
                    f"Epoch [{epoch + 1}/{args.epochs}], Batch [{i + 1}/{len(trainloader)}], "
                    f"Loss: {running_loss / 500:.4f}",
                    flush=True,
                )
                running_loss = 0.0
        epoch_seconds.append(time.perf_counter() - t0)

    correct = total = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for images, labels in testloader:
            predicted = net(images).argmax(1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    eval_seconds = time.perf_counter() - t0
    line = json.dumps(
        {"epoch_seconds": epoch_seconds, "accuracy": correct / total, "eval_seconds": eval_seconds,
         "workers": args.workers}
    )  # fmt: skip
    print(line)
    if args.result:
        with open(args.result, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
