from clinicsync_cli.app import app

app(prog_name="clinicsync")
