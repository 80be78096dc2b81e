// Azure OpenAI with the chat and embedding deployments. Keyless: local auth is off and
// the custom subdomain (required for Entra tokens) is the account name. The app's
// identity holds Cognitive Services OpenAI User on this account: inference only, no
// deployment or key management.

param name string
param location string
param tags object

@description('Chat deployments, in the model registry\'s order: [{ name, model, version, sku, capacity, tier }].')
param chatDeployments array

@description('The embedding deployment: { name, model, version, sku, capacity }.')
param embeddingDeployment object

@description('Principal (object) id of the app\'s managed identity.')
param principalId string

var openAiUser = '5e0bd9bd-7b93-4f28-af87-19fc36ad61bd'
var deployments = concat(chatDeployments, [ embeddingDeployment ])

resource account 'Microsoft.CognitiveServices/accounts@2024-10-01' = {
  name: name
  location: location
  tags: tags
  kind: 'OpenAI'
  sku: { name: 'S0' }
  properties: {
    customSubDomainName: name
    disableLocalAuth: true
    publicNetworkAccess: 'Enabled'
    networkAcls: { defaultAction: 'Allow' }
  }
}

// One at a time: the service rejects concurrent deployment changes on one account.
@batchSize(1)
resource modelDeployments 'Microsoft.CognitiveServices/accounts/deployments@2024-10-01' = [for deployment in deployments: {
  parent: account
  name: deployment.name
  sku: { name: deployment.sku, capacity: deployment.capacity }
  properties: {
    model: { format: 'OpenAI', name: deployment.model, version: deployment.version }
    versionUpgradeOption: 'NoAutoUpgrade'
  }
}]

resource inference 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(account.id, principalId, openAiUser)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', openAiUser)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

output endpoint string = account.properties.endpoint
