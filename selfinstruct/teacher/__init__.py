"""Teacher backends behind one batch interface; `make_teacher(cfg)` picks one."""

from selfinstruct.teacher.base import Completion, Request, Teacher, make_teacher

__all__ = ["Completion", "Request", "Teacher", "make_teacher"]
