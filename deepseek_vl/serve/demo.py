"""Gradio web demo for DeepSeek-VL2: `deepseek-vl2 demo --model ...`, then open http://127.0.0.1:7860.

Upload one or more images, chat over several turns with streamed answers, tune decoding with the sliders. When an
answer grounds phrases (`<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>`) the boxes are drawn, labelled,
on the conversation's last image. Images stay attached to the turn they were first sent with, as in the model's
own multi-turn format. Gradio is imported here only, never by `import deepseek_vl`.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local demo makes no telemetry or version-check calls

import gradio as gr

from deepseek_vl.grounding import draw_grounding
from deepseek_vl.utils.io import load_image

if TYPE_CHECKING:
    from deepseek_vl.chat import VLChat
    from deepseek_vl.engine import EngineStream

__all__ = ["MODEL_CARD_EXAMPLES", "build_demo", "launch", "run"]

MODEL_CARD_EXAMPLES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("visual_grounding_1.jpeg",), "<|ref|>The giraffe at the back.<|/ref|>."),
    (("visual_grounding_1.jpeg",), "<|grounding|>Describe the animals in this image."),
    (
        ("multi_image_1.jpeg", "multi_image_2.jpeg", "multi_image_3.jpeg"),
        (
            "This is image_1: <image>\nThis is image_2: <image>\nThis is image_3: <image>\n"
            " Can you tell me what are in the images?"
        ),
    ),
    (("vqa_1.jpg",), "Describe each stage of this image in detail."),
)
"""(image file names of the official repo's `images/` folder, prompt); images without `<image>` tags go first."""

CONCURRENT_SESSIONS = 8  # sessions answered at the same time (rows of the engine's batch)
BUSY = "⚠️ The previous answer is still being written: wait for it, or press Stop."

INTRO = """# DeepSeek-VL2
Upload images, ask a question, press **Send**. Ground objects with `<|ref|>the red car<|/ref|>` or
`<|grounding|>Describe the image.`: the boxes are drawn on the last image. Several images need one `<image>` tag
each where they belong in the prompt (or none: they are then placed first)."""


def build_demo(
    chat: VLChat,
    *,
    examples_dir: str | os.PathLike | None = None,
    max_images: int = 8,
    max_image_pixels: int = 4096 * 4096,
    exif_transpose: bool = False,
) -> gr.Blocks:
    """The demo's page around a loaded `VLChat`; `examples_dir` holds the model card's example images.

    Answers come from one continuous-batching `Engine` (started here), so several sessions generate together and
    a conversation's next turn reuses its images' features and its earlier turns' cache.
    """
    from deepseek_vl.engine import Engine

    engine = Engine(chat, max_rows=CONCURRENT_SESSIONS)
    engine.start()
    active: dict[str, _Answer] = {}  # session -> its answer in progress, so Stop and Clear reach it from elsewhere
    active_lock = threading.Lock()
    context = int(chat.model.config.language_config.max_position_embeddings)
    image_tag = chat.processor.image_token

    def respond(
        prompt: str,
        gallery: list | None,
        conversation: list[dict[str, Any]],
        sent: list[str],
        history: list[dict[str, Any]],
        temperature: float,
        top_p: float,
        max_new_tokens: float,
        repetition_penalty: float,
        request: gr.Request,
    ) -> Iterator[tuple]:
        """One answer at a time per session: Enter pressed while Send's answer streams would run a second turn on
        the same conversation, and the turn that finished first would be lost from what the model sees."""
        with active_lock:
            busy = request.session_hash in active
            answer = active.setdefault(request.session_hash, _Answer())
        if busy:
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), BUSY, gr.skip()
            return
        try:
            yield from answer_turn(
                answer, prompt, gallery, conversation, sent, history,
                temperature, top_p, max_new_tokens, repetition_penalty,
            )  # fmt: skip
        finally:
            with active_lock:
                del active[request.session_hash]
            answer.finished.set()

    def answer_turn(
        answer: _Answer,
        prompt: str,
        gallery: list | None,
        conversation: list[dict[str, Any]],
        sent: list[str],
        history: list[dict[str, Any]],
        temperature: float,
        top_p: float,
        max_new_tokens: float,
        repetition_penalty: float,
    ) -> Iterator[tuple]:
        """Stream one answer; yields (chatbot, conversation, sent, annotated image, status, prompt box)."""
        prompt = (prompt or "").strip()
        paths = [item[0] if isinstance(item, (tuple, list)) else item for item in gallery or []]
        new_paths = [p for p in paths if p not in sent]
        if not prompt:
            yield history, conversation, sent, gr.skip(), "Type a question first.", gr.skip()
            return
        already = sum(len(m.get("images", [])) for m in conversation)
        if already + len(new_paths) > max_images:
            problem = f"⚠️ At most {max_images} images per conversation; press Clear to start a new one."
            yield history, conversation, sent, gr.skip(), problem, gr.skip()
            return
        tags = prompt.count(image_tag)
        if tags and tags != len(new_paths):  # the gallery still shows the images sent before, which are not sent again
            problem = (
                f"⚠️ The prompt has {tags} {image_tag} tags but {len(new_paths)} new images: images sent in earlier "
                "turns stay in the conversation and take no tag; give one tag per new image, or none."
            )
            yield history, conversation, sent, gr.skip(), problem, gr.skip()
            return
        try:
            images = [_load_upload(p, max_image_pixels, exif_transpose) for p in new_paths]
        except ValueError as error:
            gr.Warning(str(error))
            yield history, conversation, sent, gr.skip(), f"⚠️ {error}", gr.skip()
            return
        turn = [*conversation, {"role": "user", "content": prompt, **({"images": images} if images else {})}]
        options = {"temperature": temperature, "top_p": top_p, "repetition_penalty": repetition_penalty}
        try:
            room = context - chat.count_prompt_tokens(turn)
            if room < 1 and not conversation:
                raise ValueError(
                    f"The prompt and its images leave no room in the model's {context}-token context: shorten the "
                    "prompt or send fewer or smaller images."
                )
            if room < 1:
                raise ValueError(f"The conversation no longer fits the model's {context}-token context; press Clear.")
            stream = engine.stream(turn, max_new_tokens=min(int(max_new_tokens), room), **options)
        except ValueError as error:
            yield history, conversation, sent, gr.skip(), f"⚠️ {error}", gr.skip()
            return

        answer.stream = stream
        if answer.cancelled.is_set():  # Stop came while the turn was prepared
            stream.close()
        shown = [gr.Image(p, show_label=False, height=160) for p in new_paths]
        before = history
        history = [
            *history,
            *({"role": "user", "content": image} for image in shown),
            {"role": "user", "content": prompt},
        ]
        history.append({"role": "assistant", "content": ""})
        try:
            yield history, conversation, sent, None, "Generating...", ""
            for piece in stream:
                history[-1] = {"role": "assistant", "content": history[-1]["content"] + piece}
                yield history, conversation, sent, gr.skip(), gr.skip(), gr.skip()
        except Exception as error:  # noqa: BLE001 - shown in the status line, which would otherwise say Generating...
            problem = f"⚠️ The answer failed ({type(error).__name__}: {error}); the turn was not kept: send it again."
            gr.Warning(problem)
            yield before, conversation, sent, gr.skip(), problem, prompt
            return
        finally:
            if stream.result is None:
                stream.close()
        result = stream.result
        conversation = [*turn, {"role": "assistant", "content": result.text}]
        all_images = [image for message in conversation for image in message.get("images", [])]
        status = _summary(result, turn=sum(m["role"] == "user" for m in conversation), full=room < int(max_new_tokens))
        annotated = None
        if result.grounding.boxes and all_images:
            labels = ", ".join(dict.fromkeys(box.label or "box" for box in result.grounding.boxes))
            drawn = draw_grounding(all_images[-1], result.grounding, image_index=len(all_images) - 1)
            annotated = gr.Image(drawn, label=f"Grounding: {labels}")
        yield history, conversation, [*sent, *new_paths], annotated, status, gr.skip()

    def stop(request: gr.Request) -> None:
        with active_lock:
            answer = active.get(request.session_hash)
        if answer is not None:
            answer.stop()

    def clear_chat(request: gr.Request) -> tuple:
        """Empty the chat; an answer still streaming is stopped and waited for, else its last update, which carries
        the conversation with its turn, would land after this one and bring the cleared conversation back."""
        with active_lock:
            answer = active.get(request.session_hash)
        if answer is not None:
            answer.stop()
            answer.finished.wait()
        return [], [], [], None, "", None

    with gr.Blocks(title="DeepSeek-VL2", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        conversation = gr.State([])  # the model's messages, images loaded
        sent = gr.State([])  # uploads already attached to a turn
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=520)
                with gr.Row():
                    prompt = gr.Textbox(
                        label="Prompt",
                        placeholder="Ask about the images...",
                        show_label=False,
                        elem_id="prompt",
                        scale=5,
                    )
                    send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
                with gr.Row():
                    stop_button = gr.Button("Stop", elem_id="stop")
                    clear = gr.Button("Clear", elem_id="clear")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=2):
                gallery = gr.Gallery(
                    label="Images", type="filepath", file_types=["image"], interactive=True, elem_id="images",
                    columns=3, height=220, preview=False, object_fit="contain",
                )  # fmt: skip
                annotated = gr.Image(
                    label="Grounding", type="pil", format="png", interactive=False, elem_id="annotated", height=320
                )
                with gr.Accordion("Generation", open=True):
                    temperature = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p (when sampling)")
                    max_new_tokens = gr.Slider(
                        1, 2048, value=512, step=1, label="Max new tokens", elem_id="max-new-tokens"
                    )
                    repetition_penalty = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="Repetition penalty")
        _examples(examples_dir, gallery, prompt)

        inputs = [prompt, gallery, conversation, sent, chatbot, temperature, top_p, max_new_tokens, repetition_penalty]
        outputs = [chatbot, conversation, sent, annotated, status, prompt]
        send.click(respond, inputs, outputs)
        prompt.submit(respond, inputs, outputs)
        stop_button.click(stop, None, None, queue=False)
        clear.click(clear_chat, None, [chatbot, conversation, sent, annotated, status, gallery])
    return demo


@dataclass
class _Answer:
    """A session's answer in progress; its stream is None while the turn is prepared (images loaded, counted)."""

    stream: EngineStream | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)  # its last update has been sent

    def stop(self) -> None:
        """End the answer after its current token; one still prepared ends as soon as its stream exists."""
        self.cancelled.set()
        if self.stream is not None:
            self.stream.close()


def _examples(examples_dir: str | os.PathLike | None, gallery: gr.Gallery, prompt: gr.Textbox) -> None:
    """The model card's examples: with their images when `examples_dir` has them, else the prompts alone."""
    folder = Path(examples_dir) if examples_dir else None
    rows = [
        [[str(folder / name) for name in names], text]
        for names, text in MODEL_CARD_EXAMPLES
        if folder is not None and all((folder / name).is_file() for name in names)
    ]
    if rows:
        gr.Examples(rows, [gallery, prompt], label="Examples from the model card", examples_per_page=8)
    else:
        gr.Examples([[text] for _, text in MODEL_CARD_EXAMPLES], [prompt], label="Prompts from the model card")


def _load_upload(path: str, max_pixels: int, exif_transpose: bool = False) -> Any:
    """Load an uploaded image; the error names the file as the user knows it, not Gradio's temporary copy."""
    try:
        return load_image(path, max_pixels=max_pixels, exif_transpose=exif_transpose)
    except ValueError as error:
        name = Path(path).name
        raise ValueError(f"Could not use the upload {name!r}: {str(error).replace(repr(path), repr(name))}") from error


def _summary(result: Any, turn: int, full: bool) -> str:
    """`full`: the answer was capped by the context's room, not by the max new tokens slider."""
    length = " (stopped: the context is full, press Clear)" if full else " (stopped at max new tokens)"
    reasons = {"stop": "", "length": length, "cancelled": " (stopped)"}
    counts = f"Turn {turn}: {result.prompt_tokens} prompt + {result.completion_tokens} answer tokens"
    boxes = "; ".join(f"{box.label or 'box'} {list(box.box)}" for box in result.grounding.boxes)
    return f"{counts}{reasons.get(result.finish_reason, '')}" + (f". Boxes: {boxes}" if boxes else "")


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int = 7860, prevent_thread_lock: bool = False) -> Any:
    """Serve the demo: sessions answered together by the engine, no share link, no server-side rendering."""
    demo.queue(default_concurrency_limit=CONCURRENT_SESSIONS)
    return demo.launch(
        server_name=host, server_port=port, share=False, prevent_thread_lock=prevent_thread_lock, show_error=True,
        ssr_mode=False, max_file_size="50mb", quiet=True,  # quiet: no hint about a share link the CLI has not
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """`deepseek-vl2 demo` (options in commands.py): load the model once, then serve the demo until Ctrl-C."""
    from deepseek_vl.serve.cli import load_chat

    chat = load_chat(args)  # the port was checked by commands.run_demo, before the heavy imports
    demo = build_demo(
        chat, examples_dir=args.examples_dir, max_images=args.max_images, max_image_pixels=args.max_image_pixels,
        exif_transpose=args.exif_transpose,
    )  # fmt: skip
    print(f"Web demo on http://{args.host}:{args.port} (Ctrl-C stops it)", file=sys.stderr, flush=True)
    launch(demo, host=args.host, port=args.port)
    return 0
