import time

import gradio as gr


def greet(name: str) -> str:
    return f"Hello {name or 'there'}, from a Space on hangar!"


def count(n: float):
    """Streams 1..n, one every 0.4 s: a generator endpoint that clients receive as
    separate events (over SSE), the way a model streams tokens."""
    for i in range(1, int(n) + 1):
        time.sleep(0.4)
        yield str(i)


with gr.Blocks(title="hangar: Gradio hello") as demo:
    gr.Markdown("# hangar: Gradio hello")
    with gr.Row():
        name = gr.Textbox(label="Your name")
        greeting = gr.Textbox(label="Greeting")
    gr.Button("Greet").click(greet, name, greeting, api_name="greet")
    with gr.Row():
        upto = gr.Number(label="Count to", value=5)
        counted = gr.Textbox(label="Count (streamed)")
    gr.Button("Count").click(count, upto, counted, api_name="count")

if __name__ == "__main__":
    demo.launch()
