"""Hosts from Terraform outputs (pyinfra's terraform connector): run pyinfra in the
Terraform directory, whose `goml_hosts` output is shaped as in terraform_example.tf
(a map cloud -> list of host data). The connector names each host `@terraform/NAME` and
puts it in the groups `@terraform` and its cloud (aws, gcp).

    pyinfra -y /path/to/goml/pyinfra/inventories/terraform.py /path/to/goml/pyinfra/deploy.py
"""

goml = ["@terraform/goml_hosts.value"]
