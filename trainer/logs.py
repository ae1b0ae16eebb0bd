"""What a run shows: progress bars, TensorBoard, and printed lines (one per epoch and test, or
with ``--dbg`` the release's, in its format and order: README, "Coming from the authors' code").
Only the main process prints or writes."""
import sys
import threading

from tqdm import tqdm

from util import distributed as dist


def release_line(name, metrics, seconds):
    """One pass in the release's format (which pads the pass name to 16 characters)."""
    quality = f"ACC: {metrics['acc']:5.4f}" if "acc" in metrics else f"MSE: {metrics['mse']:5.4f}"
    return (f"{name.ljust(16)}Loss: {metrics['loss']:5.4f}, {quality}, "
            f"Perplexity: {metrics['perplexity']:5.4f}, Time: {seconds:5.3f} sec")


def release_eval_lines(name, metrics, seconds):
    return [release_line(name, metrics, seconds)] + (
        [f"PixAcc: {metrics['pixel_acc']:5.4f} mIoU: {metrics['miou']:5.4f}"]
        if "miou" in metrics else [])


def quality_text(metrics):
    return (f"acc {metrics['acc']:.4f}" if "acc" in metrics
            else f"mse/pixel {metrics['mse_pixel']:.5f}")


def _quiet_writer_threads():
    """TensorBoard's writer thread's error (a full disk) comes again as one line in the main
    thread: its own 40-line traceback is left out."""
    hook = threading.excepthook
    if getattr(hook, "quiet_tensorboard", False):
        return

    def quiet(args):
        if type(args.thread).__name__ != "_AsyncWriterThread":
            hook(args)
    quiet.quiet_tensorboard = True
    threading.excepthook = quiet


class Display:
    """Progress bars, TensorBoard (in `tensorboard_dir`) and printed lines of one run."""

    def __init__(self, *, dbg=False, labels=False, tensorboard_dir=None, log=print):
        self.is_main, self.dbg, self.labels = dist.is_main(), dbg, labels
        self.log = log if self.is_main else (lambda *_: None)
        self.show_bars = self.is_main and sys.stderr.isatty()
        self.tensorboard_dir, self._writer = tensorboard_dir if self.is_main else None, None

    def progress(self, total, desc):
        """A tqdm bar in images (rate in img/s, ETA) on a terminal; silent otherwise."""
        return tqdm(total=total, desc=desc, unit="img", unit_scale=True, leave=False,
                    dynamic_ncols=True, disable=not self.show_bars, file=sys.stderr)

    def _tensorboard(self, method, *args):
        """The TensorBoard writer's `method`(*args); its OSError (a full disk) names the folder."""
        if self.tensorboard_dir is None:
            return
        try:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter
                _quiet_writer_threads()
                self._writer = SummaryWriter(log_dir=self.tensorboard_dir)
            getattr(self._writer, method)(*args)
        except OSError as e:
            raise OSError(e.errno, e.strerror or str(e), self.tensorboard_dir) from None

    def interval(self, entry, bar):
        """A train_step record: to TensorBoard and onto the progress bar."""
        for key, value in entry.items():
            if key not in ("epoch", "split", "step", "seconds"):
                self._tensorboard("add_scalar", f"step/{key}", value, entry["step"])
        quality = ("acc", entry["acc"]) if "acc" in entry else ("mse", entry["mse"])
        shown = {"loss": f"{entry['loss']:.1f}", quality[0]: f"{quality[1]:.4g}",
                 "ppl": f"{entry['perplexity']:.1f}"}
        if "temperature" in entry:  # the stochastic quantizers' only
            shown["tau"] = f"{entry['temperature']:.3g}"
        bar.set_postfix(shown, refresh=False)

    def records(self, entries, step=None):
        """Records to TensorBoard at `step` or each record's own "step" (docs/usage.md)."""
        for entry in entries:
            for key, value in entry.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self._tensorboard("add_scalar", f"{entry['split']}/{key}", value,
                                      entry["step"] if step is None else step)
        self._tensorboard("flush")

    def images(self, tag, grid, step):
        self._tensorboard("add_image", tag, grid, step)

    def close(self):
        if self._writer is not None:
            self._tensorboard("close")
            self._writer = None

    def start(self, model_name, run_dir):
        if self.dbg:
            self.log("Complete dataload")
            self.log(f"=== {model_name.upper()} ===")
            if run_dir is not None:
                self.log(run_dir)
        elif run_dir is not None:
            self.log(f"run folder: {run_dir}")

    def epoch(self, epoch, epoch_max, step, passes, saved, best_epoch):
        """passes: (train, val_stochastic, val) as (metrics, seconds) pairs."""
        (train, train_s), (val_s, val_s_s), (val, val_seconds) = passes
        if not self.dbg:
            self.log(f"epoch {epoch}/{epoch_max} step {step}: train loss {train['loss']:.2f}, "
                     f"val loss {val['loss']:.2f}, {quality_text(val)}, perplexity "
                     f"{val['perplexity']:.1f}, {train_s:.1f}s + {val_s_s + val_seconds:.1f}s")
            return
        name = "Val" if self.labels else "Validation"
        last = "----Saving model!" if saved else f"----Not saving model! Last saved: {best_epoch}"
        for line in [f"[Epoch={epoch}]", release_line("Train", train, train_s),
                     *release_eval_lines(name, val_s, val_s_s),
                     *release_eval_lines(name, val, val_seconds), last]:
            self.log(line)

    def best_loaded(self, run_dir):
        if self.dbg:
            if run_dir is not None:
                self.log(run_dir)
            self.log("Best models were loaded!!")

    def test(self, epoch, stochastic, deterministic, name="test"):
        """The (metrics, seconds) of the two passes over the test split (or split `name`)."""
        if self.dbg:
            for metrics, seconds in (stochastic, deterministic):
                for line in release_eval_lines("Test", metrics, seconds):
                    self.log(line)
            return
        metrics, seconds = deterministic
        which = "best.pt" if epoch is None else f"best.pt, epoch {epoch}"
        self.log(f"{name} ({which}): loss {metrics['loss']:.2f}, {quality_text(metrics)}, "
                 f"perplexity {metrics['perplexity']:.1f}"
                 + (f", mIoU {metrics['miou']:.4f}" if "miou" in metrics else "")
                 + f", {seconds:.1f}s")
