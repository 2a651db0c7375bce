from llm_manager.cli.main import main

main()
