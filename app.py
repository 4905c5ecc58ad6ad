"""DGQ Studio: FP vs baseline PTQ vs DGQ on the same prompt and seed (Gradio app).

Hugging Face Spaces imports this file and serves `demo`; `python app.py` serves it locally
(`GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT` choose the address). The model loads in a background
thread, so the page is served before it is ready.
"""

from __future__ import annotations

import logging

from app import get_demo
from app.ui import CSS, THEME

demo = get_demo()

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    demo.launch(theme=THEME, css=CSS, footer_links=["api", "gradio"])
