"""kdrun: config-driven knowledge-distillation experiments in PyTorch."""

__version__ = "0.1.0"


def load_student(run_dir):
    """The distilled student of a finished run, ready for inference (see :func:`kdrun.loading.load_student`)."""
    from kdrun.loading import load_student as load  # torch and the models load only when asked for

    return load(run_dir)
