"""selfinstruct: seed tasks -> teacher-generated instruction data -> LoRA-tuned student, round after round."""

__version__ = "0.1.0"
