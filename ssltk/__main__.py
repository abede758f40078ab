from ssltk.cli import app

app(prog_name="ssltk")
