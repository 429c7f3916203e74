import gradio as gr


def greet(name: str) -> str:
    return f"Hello {name or 'there'}, from a Space on hangar!"


demo = gr.Interface(fn=greet, inputs="text", outputs="text", title="hangar: Gradio hello")

if __name__ == "__main__":
    demo.launch()
