"""Knowledge distillation: train the pruned student toward the uncompressed teacher's logits.

Loss = T² · KL(teacher ∥ student) of the temperature-softened next-token distributions (forward
KL, as Minitron), averaged over every real text position of the sequence (not padding, not the
positions inside an image, whose "next token" is just another image slot). The student's language
model is trained in full; its vision tower and projector stay frozen. Checkpoints hold the
student's weights, the optimizer, the step and the RNG, so a killed run resumes exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lorafleet.data.batch import Batch, collate
from lorafleet.data.encode import Example
from lorafleet.data.stream import ExampleStream
from lorafleet.models.loading import FrozenBase
from lorafleet.state import load_state, restore_rng_state, rng_state, save_state


@dataclass
class DistilOptions:
    steps: int = 100
    learning_rate: float = 1e-4
    batch_size: int = 4
    temperature: float = 1.0
    seed: int = 0
    checkpoint: Path | None = None  # where to save (and resume from) the distillation state
    checkpoint_every: int = 50
    progress: bool = True


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, positions: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T² · KL(teacher ∥ student) at the selected positions (a bool mask of shape (B, L))."""
    student = F.log_softmax(student_logits[positions].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[positions].float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def text_positions(batch: Batch, image_token_id: int | None) -> torch.Tensor:
    positions = batch.attention_mask.bool()
    if image_token_id is not None:
        positions &= batch.input_ids != image_token_id
    return positions


@torch.no_grad()
def held_out_kl(
    student: FrozenBase, teacher: FrozenBase, examples: Sequence[Example], temperature: float = 1.0
) -> float:
    """Mean per-position KL(teacher ∥ student) over `examples`."""
    total, count = 0.0, 0
    image_token = _image_token_id(student)
    for start in range(0, len(examples), 8):
        batch = collate(examples[start : start + 8], student.tokenizer.pad_token_id).to(student.device)
        positions = text_positions(batch, image_token)
        loss = distillation_loss(
            student.model(**batch.model_inputs()).logits,
            teacher.model(**batch.model_inputs()).logits,
            positions,
            temperature,
        )
        total, count = total + float(loss) * int(positions.sum()), count + int(positions.sum())
    return total / max(count, 1)


def distil(
    student: FrozenBase,
    teacher: FrozenBase,
    examples: Sequence[Example],
    options: DistilOptions,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Train the student's language model toward the teacher; returns the loss per step."""
    trainable = [p for p in student.language_model.parameters()]
    for param in trainable:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=options.learning_rate)
    stream = ExampleStream(list(examples), options.batch_size, options.seed)
    step, losses = 0, []
    torch.manual_seed(options.seed)
    if options.checkpoint is not None and options.checkpoint.exists():
        step, losses = _restore(options.checkpoint, student, optimizer, stream)
    if options.checkpoint is not None:
        options.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    image_token = _image_token_id(student)
    student.model.train()
    bar = tqdm(total=options.steps, initial=step, desc="distil", disable=not options.progress)
    try:
        while step < options.steps:
            batch = collate(stream.next_micro_batch(), student.tokenizer.pad_token_id).to(student.device)
            with torch.no_grad():
                teacher_logits = teacher.model(**batch.model_inputs(), use_cache=False).logits
            student_logits = student.model(**batch.model_inputs(), use_cache=False).logits
            loss = distillation_loss(
                student_logits, teacher_logits, text_positions(batch, image_token), options.temperature
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(float(loss.detach()))
            bar.set_postfix(kl=f"{losses[-1]:.4f}", refresh=False)
            bar.update(1)
            if options.checkpoint is not None and step % options.checkpoint_every == 0:
                _save(options.checkpoint, student, optimizer, stream, step, losses)
            if on_step is not None:
                on_step(step)
    finally:
        bar.close()
        student.model.eval()
        for param in trainable:
            param.requires_grad_(False)
    return losses


def _image_token_id(model: FrozenBase) -> int | None:
    return model.tokenizer.convert_tokens_to_ids(model.image_token) if model.is_multimodal else None


def _save(path: Path, student: FrozenBase, optimizer, stream: ExampleStream, step: int, losses: list[float]) -> None:
    state = {
        "weights": {k: v.detach().cpu() for k, v in student.language_model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "position": stream.position,
        "step": step,
        "losses": losses,
        "rng": rng_state(),
    }
    save_state(state, path)


def _restore(path: Path, student: FrozenBase, optimizer, stream: ExampleStream) -> tuple[int, list[float]]:
    state = load_state(path)
    student.language_model.load_state_dict(state["weights"])
    optimizer.load_state_dict(state["optimizer"])
    stream.position = state["position"]
    restore_rng_state(state["rng"])
    return state["step"], state["losses"]
