"""Synthetic verifiable reasoning tasks: generator, CoT trace, answer and trace checkers."""

from posttrain.tasks.arithmetic import Arithmetic
from posttrain.tasks.base import Example, Task
from posttrain.tasks.countdown import Countdown
from posttrain.tasks.product import Product

TASKS: dict[str, Task] = {"arithmetic": Arithmetic(), "countdown": Countdown(),
                         "product": Product()}

__all__ = ["TASKS", "Example", "Task", "get_task"]


def get_task(name: str) -> Task:
    """The task called `name`; ValueError naming the known ones otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]
