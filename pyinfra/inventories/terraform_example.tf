# Hosts for goml's deploy from Terraform, read by pyinfra's terraform connector:
#
#   cd your-terraform-dir && pyinfra -y @terraform/goml_hosts.value /path/to/goml/pyinfra/deploy.py
#   (or the inventory file pyinfra/inventories/terraform.py)
#
# The output is a map of group name (the cloud) to a list of hosts; each host's keys become
# its pyinfra host data, so it carries everything deploy.py validates (goml_node,
# goml_cloud, goml_region, goml_roles, goml_address). Resource names are examples.

output "goml_hosts" {
  value = {
    aws = [
      for i, vm in aws_instance.goml : {
        name          = "aws-${i + 1}"
        ssh_hostname  = vm.public_ip
        ssh_user      = "admin"
        _sudo         = true
        goml_node     = "aws-${i + 1}"
        goml_cloud    = "aws"
        goml_region   = "us-east-1"
        goml_roles    = ["control", "agent"]
        goml_address  = vm.private_ip
      }
    ]
    gcp = [
      for i, vm in google_compute_instance.goml : {
        name          = "gcp-${i + 1}"
        ssh_hostname  = vm.network_interface[0].access_config[0].nat_ip
        ssh_user      = "admin"
        _sudo         = true
        goml_node     = "gcp-${i + 1}"
        goml_cloud    = "gcp"
        goml_region   = "us-central1"
        goml_roles    = ["control", "agent"]
        goml_address  = vm.network_interface[0].network_ip
      }
    ]
  }
}
