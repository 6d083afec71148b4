from clinicsync_ident.cli import app

app(prog_name="clinicsync-ident")
