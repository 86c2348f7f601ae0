"""Chat prompts: the model's own chat template rendered as transformers renders it, and the ids that end a reply.

    template = load_chat_template("model.gguf", tokenizer)     # or session.chat_template
    text = template.render(messages, add_generation_prompt=True)
    ids = template.encode(messages)                            # special tokens parsed, one BOS
    template.stop_ids                                          # end-of-turn ids for chat requests
"""

from __future__ import annotations

from .end_of_turn import end_of_turn_ids
from .sources import check_template_file, load_chat_template
from .template import ChatTemplate

__all__ = ["ChatTemplate", "check_template_file", "end_of_turn_ids", "load_chat_template"]
