"""A tiny stand-in of gradio 3.43's component classes (SD.Next's UI toolkit) for the tests.

Components record their keyword arguments and expose ``value``; ``change(fn, inputs, outputs)`` records the
event (``fire_change(value)`` runs it as gradio would and updates the outputs); ``Accordion`` is a context manager.
Only used when the real gradio is not importable ahead of it (the stub folder goes first on sys.path).
"""

__version__ = "3.43.2-stub"
created = []


class Component:
    def __init__(self, value=None, *, label=None, **kwargs):
        self.value = value
        self.label = label
        self.kwargs = kwargs
        self.events = []
        created.append(self)

    def change(self, fn=None, inputs=None, outputs=None, **kwargs):
        self.events.append((fn, list(inputs or []), list(outputs or [])))

    def fire_change(self, value):
        self.value = value
        for fn, inputs, outputs in self.events:
            result = fn(*(c.value for c in inputs))
            results = result if isinstance(result, tuple) else (result,)
            for comp, v in zip(outputs, results, strict=True):
                comp.value = v


class Checkbox(Component):
    pass


class Radio(Component):
    pass


class Dropdown(Component):
    pass


class Textbox(Component):
    pass


class Slider(Component):
    pass


class Number(Component):
    pass


class Markdown(Component):
    pass


class Accordion:
    def __init__(self, label=None, *, open=True, **kwargs):
        self.label = label
        self.open = open
        self.kwargs = kwargs
        created.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
