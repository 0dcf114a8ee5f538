"""A tiny stand-in of gradio 3.43's component classes (SD.Next's UI toolkit) for the tests.

Components record their keyword arguments and expose ``value``; ``Accordion`` is a context manager.
Only used when the real gradio is not importable ahead of it (the stub folder goes first on sys.path).
"""

__version__ = "3.43.2-stub"
created = []


class Component:
    def __init__(self, value=None, *, label=None, **kwargs):
        self.value = value
        self.label = label
        self.kwargs = kwargs
        created.append(self)


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
