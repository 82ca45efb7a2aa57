from rerank_cli.cli import main

main()
