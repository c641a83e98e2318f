"""Helper of test_training: train 2 Gloo processes, then each rank saves its final weights as weights_rankN.pt and,
on Linux, writes the names of the threads it still runs after `run()` returns to threads_rankN.txt."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import train_simple_ddp  # noqa: E402
import train_simple_worker  # noqa: E402


def probe(rank, world_size, argv, out):
    torch.set_num_threads(1)
    args = train_simple_ddp.parse_args(argv)
    original = train_simple_worker.Trainer.fit

    def fit_and_save(self):
        code = original(self)
        torch.save(self.model.state_dict(), os.path.join(out, f"weights_rank{rank}.pt"))
        return code

    train_simple_worker.Trainer.fit = fit_and_save
    train_simple_worker.run(rank, world_size, rank, args)
    if os.path.isdir("/proc/self/task"):
        names = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
        with open(os.path.join(out, f"threads_rank{rank}.txt"), "w") as f:
            f.write("\n".join(names))


if __name__ == "__main__":
    out, argv = sys.argv[1], sys.argv[2:]
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(train_simple_ddp.free_port())
    mp.spawn(probe, args=(2, argv, out), nprocs=2)
