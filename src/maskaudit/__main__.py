from maskaudit.cli import app

app(prog_name="maskaudit")
