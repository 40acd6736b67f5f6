"""A natural partition: every sample says which client it belongs to, as the writers of FEMNIST do.

sklearn's digits carry no writer ids, so this example makes up writers: each of 12 "writers" draws
mostly from a few digit classes of their own and writes a little off-centre in their own direction
(a per-writer shift). ``client_ids`` keeps every writer's samples together on one client, and
each client's own test set is held out from its own samples.

    python examples/natural_partition.py [--rounds 20] [--out runs/examples/natural]
"""

import argparse

import numpy as np
from sklearn.datasets import load_digits

import fedbabu


def writers_of(labels: np.ndarray, writers: int, rng: np.random.Generator) -> np.ndarray:
    """A writer name per sample: each writer's class mix drawn from Dirichlet(0.3)."""
    preference = rng.dirichlet(np.full(10, 0.3), size=writers)  # writers x classes
    weights = preference[:, labels]  # how much each writer wants each sample
    chosen = np.array([rng.choice(writers, p=w / w.sum()) for w in weights.T])
    return np.array([f"writer-{w:02d}" for w in chosen])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default="runs/examples/natural")
    args = parser.parse_args()

    rng = np.random.default_rng(7)
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    writer = writers_of(digits.target, 12, rng)
    # Each writer's own slant: shift their images by one pixel in a writer-specific direction.
    for index, name in enumerate(sorted(set(writer))):
        dy, dx = [(0, 0), (0, 1), (1, 0), (0, -1), (-1, 0), (1, 1)][index % 6]
        mine = writer == name
        images[mine] = np.roll(images[mine], (dy, dx), axis=(1, 2))

    data = fedbabu.from_arrays(images, digits.target, client_ids=writer, test_fraction=0.25)
    config = fedbabu.load_config(extra={"algorithm": "fedbabu", "rounds": args.rounds, "eval_every": 5})
    results = fedbabu.run(config, data=data, out=args.out, overwrite=True)

    print(f"{results.config.num_clients} clients (from client_ids), partition {results.config.partition}")
    for client in results.clients:
        name = data.client_names[client["client"]]
        print(f"{name}: {client['train_size']} train / {client['test_size']} test images, "
              f"accuracy {100 * client['accuracies'][0]:.1f}% -> {100 * client['accuracies'][-1]:.1f}%")
    print(f"personalized accuracy {100 * results.personalized_accuracy:.2f}%, run folder: {results.folder}")


if __name__ == "__main__":
    main()
